"""Recipes and the option declarations (common/options.py, common/recipes.py) on the synth side."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from common import options
from common.errors import UserError
from common.models import InputSpec
from common.recipes import choose_recipe, load_recipe, shipped_names
from common.shards import read_manifest
from synth.cli import generate_cmd
from synth.cli import main as synth_cli
from synth.generate import GenerateConfig, generate, resolve_config
from synth.methods import METHODS, parse_config

MNIST_SPEC = InputSpec(1, 28, (0.1307,), (0.3081,), 10)
# what makes a run with the small-grey recipe short enough for a test (everything else: the recipe's)
QUICK = ["--num-images", "16", "--set", "num_generators=1", "--set", "steps=1", "--set", "train_batch_size=8",
         "--set", "width=4", "--write-workers", "0", "--quiet"]


def _generate(tiny_teacher_path, out, *args):
    result = CliRunner().invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                                            "--out", str(out), *QUICK, *args])
    return result


def test_no_flags_resolve_the_small_grey_recipe(tiny_teacher_path):
    """A Python caller (and the CLI) giving only teacher and weights gets the MNIST main job's settings."""
    resolved = resolve_config(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path)), MNIST_SPEC)
    cfg = resolved.config
    assert resolved.recipe.name == "small-grey"
    assert resolved.reason == "recipe: small-grey (auto: 1-channel 28 px teacher; measured on MNIST lenet5)"
    assert (cfg.num_images, cfg.shard_size, cfg.image_format, cfg.method) == (96_000, 4_000, "npy", "generator")
    method = parse_config(METHODS["generator"].Config, cfg.method_options)
    assert (method.num_generators, method.steps, method.train_batch_size, method.width, method.latent_dim) == \
        (8, 200, 200, 16, 64)
    assert (method.diversity_weight, method.feature_diversity_weight, method.sample_noise_scale) == (20, 10, 2)
    plain = resolve_config(GenerateConfig(teacher="lenet5", recipe="none"), MNIST_SPEC).config
    assert (plain.num_images, plain.image_format, plain.method_options) == (50_000, "png", {})


def test_cli_start_line_and_manifest_record_the_recipe(tiny_teacher_path, tmp_path):
    result = _generate(tiny_teacher_path, tmp_path / "auto")
    assert result.exit_code == 0, result.output
    assert "recipe: small-grey (auto: 1-channel 28 px teacher; measured on MNIST lenet5)" in result.output
    manifest = read_manifest(tmp_path / "auto")
    assert manifest.recipe["name"] == "small-grey" and len(manifest.recipe["sha256"]) == 64
    assert manifest.recipe["path"].endswith("small-grey.toml") and manifest.recipe["reason"].startswith("recipe: ")
    resolved, method = manifest.options["generate"], manifest.options["method"]
    assert (resolved["num_images"], resolved["shard_size"], resolved["image_format"]) == (16, 4000, "npy")
    assert (method["steps"], method["diversity_weight"], method["sample_noise_scale"]) == (1, 20.0, 2.0)
    # naming the recipe gives the same config (hash) and bytes as choosing it automatically
    named = _generate(tiny_teacher_path, tmp_path / "named", "--recipe", "small-grey")
    assert named.exit_code == 0, named.output
    again = read_manifest(tmp_path / "named")
    assert again.config_sha256 == manifest.config_sha256 and again.shards == manifest.shards
    assert "recipe: small-grey (--recipe small-grey; measured on MNIST lenet5)" in named.output


def test_explicit_flags_override_the_recipe(tiny_teacher_path, tmp_path):
    result = _generate(tiny_teacher_path, tmp_path / "o", "--image-format", "png", "--set", "sample_noise_scale=1",
                       "--shard-size", "8")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "o")
    assert (manifest.image_format, manifest.shard_size, len(manifest.shards)) == ("png", 8, 2)
    assert manifest.options["method"]["sample_noise_scale"] == 1.0
    assert manifest.options["method"]["diversity_weight"] == 20.0   # still the recipe's


def test_recipe_file_by_path(tiny_teacher_path, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "a test"\nmeasured_on = []\n[synth]\nshard-size = 4\nimage_format = "png"\n'
                    '[synth.method.generator]\nlatent_dim = 8\n')
    result = _generate(tiny_teacher_path, tmp_path / "o", "--recipe", str(path))
    assert result.exit_code == 0, result.output
    assert f"recipe: mine (--recipe {path}; not measured yet)" in result.output
    manifest = read_manifest(tmp_path / "o")
    assert (manifest.shard_size, manifest.image_format, manifest.options["method"]["latent_dim"]) == (4, "png", 8)
    assert manifest.options["method"]["diversity_weight"] == 1.0   # the declared default: not in this recipe
    assert manifest.recipe["path"] == str(path.resolve())


@pytest.mark.parametrize("text, message", [
    (None, "unknown recipe 'nope'; shipped recipes: imagenet, small-grey, small-rgb"),
    ("[synth\nnum_images = 3\n", "is not valid TOML"),
    ("[synth]\nnum_imagez = 3\n", "[synth]: unknown option 'num_imagez'; valid options:"),
    ("[synth]\nnum_images = 'many'\n", "[synth] num_images expects an integer, got 'many'"),
    ("[synth]\nnum_images = 0\n", "--num-images must be at least 1 (got 0)"),
    ("[synth.method.generator]\nstepz = 3\n", "[synth.method.generator]: unknown option 'stepz'"),
    ("[synth.method.gan]\nsteps = 3\n", "[synth.method.gan] is not a method"),
    ("[stage]\nx = 1\n", "unknown key(s) stage"),
])
def test_bad_recipes_are_user_errors(tmp_path, text, message):
    recipe = "nope"
    if text is not None:
        recipe = str(tmp_path / "bad.toml")
        (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(UserError) as error:
        resolve_config(GenerateConfig(teacher="lenet5", recipe=recipe), MNIST_SPEC)
    assert message in error.value.message
    if text is not None and "TOML" in message:
        assert "bad.toml" in error.value.message and "line 1" in error.value.message


def test_changed_byte_changing_option_on_a_rerun_is_refused_by_name(tiny_teacher_path, tmp_path):
    assert _generate(tiny_teacher_path, tmp_path / "o").exit_code == 0
    result = _generate(tiny_teacher_path, tmp_path / "o", "--set", "diversity_weight=5")
    assert result.exit_code == 2
    assert "method option diversity_weight 20.0 there, 5.0 now" in result.output
    assert "--overwrite" in result.output and "another --out" in result.output
    result = _generate(tiny_teacher_path, tmp_path / "o", "--image-format", "png")
    assert '--image-format "npy" there, "png" now' in result.output
    # execution-only options may change
    assert _generate(tiny_teacher_path, tmp_path / "o", "--write-workers", "1").exit_code == 0


def test_choose_recipe_by_teacher_input():
    rgb, why = choose_recipe(InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3, 10))
    assert rgb.name == "small-rgb" and "auto: 3-channel 32 px teacher; measured on MNIST-M" in why
    big, why = choose_recipe(InputSpec(3, 224, (0.5,) * 3, (0.25,) * 3, 1000))
    assert big.name == "imagenet" and "nothing measured for a teacher like this: using the closest, imagenet" in why
    grey64, why = choose_recipe(InputSpec(1, 64, (0.5,), (0.25,), 10))
    assert grey64.name == "small-grey" and "nothing measured" in why


def test_every_shipped_recipe_parses_for_every_method():
    assert shipped_names() == ["imagenet", "small-grey", "small-rgb"]
    spec = InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3, 10)
    for name in shipped_names():
        recipe = load_recipe(name)
        assert recipe.description and set(recipe.method) <= set(METHODS)
        for method in METHODS:
            cfg = resolve_config(GenerateConfig(teacher="x", recipe=name, method=method), spec).config
            parse_config(METHODS[method].Config, cfg.method_options)


def test_synth_methods_prints_each_options_meaning():
    result = CliRunner().invoke(synth_cli, ["methods"])
    assert result.exit_code == 0
    assert "  train_batch_size = 64  Images per generator training step" in result.output
    assert "  flip = true  Random horizontal flips" in result.output
    assert "upsample_mode = bilinear  How low-resolution images" in result.output and "(one of nearest" in result.output
    assert "[recipes set it]" in result.output


def test_no_option_default_is_written_twice():
    """Every `synth generate` flag of a GenerateConfig option defaults to None (unset: the recipe or the
    declaration decides), and its help shows the declared default."""
    declared = {s.name: s for s in options.options_of(GenerateConfig)}
    flags = {p.name: p for p in generate_cmd.params}
    assert {n for n, s in declared.items() if s.cli} <= set(flags)
    for name, spec in declared.items():
        if spec.cli:
            assert flags[name].default is None, name
            if not spec.required:
                assert "default: " in flags[name].help, name
    help_text = CliRunner().invoke(synth_cli, ["generate", "--help"]).output
    assert "[default: DEFAULT]" in help_text and "--write-batch-size" in help_text and "--batch-size " not in help_text


def test_option_helpers():
    from common.options import explicit_values, hashed, parse_value, resumable

    spec = {s.name: s for s in options.options_of(METHODS["muse"].Config)}
    assert parse_value(spec["scales"], "0.5, 1") == (0.5, 1.0) and parse_value(spec["scales"], [1]) == (1.0,)
    assert parse_value(spec["steps"], 3.0) == 3
    flip = {s.name: s for s in options.options_of(METHODS["deepinversion"].Config)}["flip"]
    assert parse_value(flip, "no") is False and parse_value(flip, True) is True
    with pytest.raises(UserError, match="--set flip expects true or false, got 'maybe'"):
        parse_value(flip, "maybe", "--set")
    assert "write_workers" in resumable(GenerateConfig) and "num_images" not in resumable(GenerateConfig)
    cfg = GenerateConfig(teacher="lenet5", write_workers=3)
    assert "write_workers" not in hashed(cfg) and hashed(cfg)["num_images"] == 50_000
    assert options.explicit_fields(cfg) == {"teacher", "write_workers"}
    assert explicit_values({"a": None, "b": 0, "c": False}) == {"b": 0, "c": False}
    json.dumps(hashed(cfg))
