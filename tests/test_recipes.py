"""Recipes and the option declarations (common/options.py, common/recipes.py), both stages."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from dfkd.common import options
from dfkd.common.errors import UserError
from dfkd.common.models import InputSpec
from dfkd.distill.losses import LOSSES
from dfkd.common.recipes import choose_recipe, load_recipe, resolve_recipe, shipped_names
from dfkd.common.shards import TeacherRecord, build_manifest, read_manifest
from dfkd.distill.cli import main as distill_cli
from dfkd.distill.cli import teacher_command, train_command
from dfkd.distill.config import TrainConfig
from dfkd.distill.teacher import TeacherConfig
from dfkd.synth.cli import generate_cmd
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.generate import GenerateConfig, generate
from dfkd.synth.methods import METHODS, parse_config

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
    resolved = resolve_recipe(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path)), MNIST_SPEC)
    cfg = resolved.config
    assert resolved.recipe.name == "small-grey"
    assert resolved.reason == "recipe: small-grey (auto: 1-channel 28 px teacher; measured on MNIST lenet5, MNIST-M grey lenet5, MNIST-M digit pairs grey lenet5)"
    assert (cfg.num_images, cfg.shard_size, cfg.image_format, cfg.method) == (96_000, 4_000, "npy", "generator")
    method = parse_config(METHODS["generator"].Config, cfg.method_options)
    assert (method.num_generators, method.steps, method.train_batch_size, method.width, method.latent_dim) == \
        (8, 200, 200, 16, 64)
    assert (method.diversity_weight, method.feature_diversity_weight, method.sample_noise_scale) == (20, 10, 1)
    plain = resolve_recipe(GenerateConfig(teacher="lenet5", recipe="none"), MNIST_SPEC).config
    assert (plain.num_images, plain.image_format, plain.method_options) == (50_000, "png", {})


def test_cli_start_line_and_manifest_record_the_recipe(tiny_teacher_path, tmp_path):
    result = _generate(tiny_teacher_path, tmp_path / "auto")
    assert result.exit_code == 0, result.output
    assert "recipe: small-grey (auto: 1-channel 28 px teacher; measured on MNIST lenet5, MNIST-M grey lenet5, MNIST-M digit pairs grey lenet5)" in result.output
    manifest = read_manifest(tmp_path / "auto")
    assert manifest.recipe["name"] == "small-grey" and len(manifest.recipe["sha256"]) == 64
    assert manifest.recipe["path"].endswith("small-grey.toml") and manifest.recipe["reason"].startswith("recipe: ")
    resolved, method = manifest.options["generate"], manifest.options["method"]
    assert (resolved["num_images"], resolved["shard_size"], resolved["image_format"]) == (16, 4000, "npy")
    assert (method["steps"], method["diversity_weight"], method["sample_noise_scale"]) == (1, 20.0, 1.0)
    # naming the recipe gives the same config (hash) and bytes as choosing it automatically
    named = _generate(tiny_teacher_path, tmp_path / "named", "--recipe", "small-grey")
    assert named.exit_code == 0, named.output
    again = read_manifest(tmp_path / "named")
    assert again.config_sha256 == manifest.config_sha256 and again.shards == manifest.shards
    assert "recipe: small-grey (--recipe small-grey; measured on MNIST lenet5, MNIST-M grey lenet5, MNIST-M digit pairs grey lenet5)" in named.output


def test_explicit_flags_override_the_recipe(tiny_teacher_path, tmp_path):
    result = _generate(tiny_teacher_path, tmp_path / "o", "--image-format", "png", "--set", "sample_noise_scale=1.5",
                       "--shard-size", "8")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "o")
    assert (manifest.image_format, manifest.shard_size, len(manifest.shards)) == ("png", 8, 2)
    assert manifest.options["method"]["sample_noise_scale"] == 1.5
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
    (None, "unknown recipe 'nope'; shipped recipes: cifar10, cifar100, imagenet, small-grey, small-rgb"),
    ("[synth\nnum_images = 3\n", "is not valid TOML"),
    ("[synth]\nnum_imagez = 3\n", "[synth]: unknown option 'num_imagez'; valid options:"),
    ("[synth]\nnum_images = 'many'\n", "[synth] num_images expects an integer, got 'many'"),
    ("[synth]\nnum_images = 0\n", "recipe bad.toml [synth] num_images must be at least 1 (got 0)"),
    ("[synth]\nresolution = 4\n", "recipe bad.toml [synth] resolution must be at least 8 (got 4)"),
    ("[synth]\nimage_format = 'gif'\n", "recipe bad.toml [synth] image_format must be one of png, jpg, npy"),
    ("[synth.method.generator]\nsteps = -3\n", "recipe bad.toml [synth.method.generator] steps must be at least 0"),
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
        resolve_recipe(GenerateConfig(teacher="lenet5", recipe=recipe), MNIST_SPEC)
    assert message in error.value.message
    if text is not None and "TOML" in message:
        assert "bad.toml" in error.value.message and "line 1" in error.value.message


def test_a_recipe_cannot_set_what_belongs_to_one_invocation(tmp_path):
    """A shared recipe with `overwrite = true` would delete earlier output on every run that uses it, one with
    `out` or `estimate` would redirect or skip the run: refused, naming the file, table and key and the fix."""
    path = tmp_path / "shared.toml"
    for text, fix in (("[synth]\noverwrite = true\n", "pass --overwrite on the command line"),
                      ("[synth]\nestimate = true\n", "pass --estimate on the command line"),
                      ("[synth]\nout = 'elsewhere'\n", "pass --out on the command line"),
                      ("[synth]\nprogress = false\n", "remove it")):
        path.write_text(text)
        with pytest.raises(UserError) as error:
            resolve_recipe(GenerateConfig(teacher="lenet5", recipe=str(path)), MNIST_SPEC)
        key = text.split("\n")[1].split(" =")[0]
        assert error.value.message == (f"recipe shared.toml [synth] {key}: a recipe cannot set it (it belongs to one "
                                       f"invocation): {fix}")
    for text in ("[distill]\nresume = true\n", "[distill]\nout = 'x'\n", "[distill]\nshards = 'x'\n"):
        path.write_text(text)
        with pytest.raises(UserError, match=r"a recipe cannot set it"):
            _run(_manifest(), recipe=str(path))


def test_every_recipe_value_is_checked_even_when_overridden(tmp_path):
    """A recipe is a shared file: a bad value is refused whether or not a flag (or --set, or another
    method) takes its place, and the error names the file, section and key, not a flag."""
    path = tmp_path / "shared.toml"
    cases = [
        ("[synth]\nnum_images = -5\n", dict(num_images=400), "[synth] num_images must be at least 1 (got -5)"),
        ("[synth.method.generator]\nsteps = -3\n", dict(method_options={"steps": "20"}),
         "[synth.method.generator] steps must be at least 0 (got -3)"),
        ("[synth.method.muse]\nscales = [3.0]\n", dict(method="generator"), "[synth.method.muse] scales must be"),
    ]
    for text, given, message in cases:
        path.write_text(text)
        with pytest.raises(UserError) as error:
            resolve_recipe(GenerateConfig(teacher="lenet5", recipe=str(path), **given), MNIST_SPEC)
        assert error.value.message.startswith(f"recipe shared.toml {message}"), error.value.message
    path.write_text("[distill.loss.kd]\ntemperature = -1.0\n")
    with pytest.raises(UserError, match=r"^recipe shared.toml \[distill.loss.kd\] temperature must be positive \(got -1\)$"):
        _run(_manifest(), recipe=str(path), loss_options={"temperature": 2.0})
    path.write_text("[distill]\ntemperature = 2.0\n")   # a loss's option has the loss's table
    with pytest.raises(UserError, match=r"^recipe shared.toml \[distill\] temperature is an option of the loss kd: "
                                        r"move it to \[distill.loss.kd\]$"):
        _run(_manifest(), recipe=str(path))
    # values that do not work together: the flag's error, naming the recipe key that set one of them
    path.write_text("[distill]\nwarmup_epochs = 20.0\n")
    with pytest.raises(UserError, match=r"--warmup-epochs must not exceed --epochs \(got 20 > 10\) "
                                        r"\(--warmup-epochs is recipe shared.toml \[distill\] warmup_epochs\)$"):
        _run(_manifest(), recipe=str(path))
    with pytest.raises(UserError, match=r"must not exceed --epochs \(got 20 > 3\)$"):   # both given: no recipe
        _run(_manifest(), recipe=str(path), warmup_epochs=20.0, epochs=3)
    assert _run(_manifest(), recipe=str(path), epochs=30).config.warmup_epochs == 20.0


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
    # the CIFAR bundle's teachers (its normalisation and class count, 32 px): the protocol's recipes, not small-rgb
    from dfkd.common.input_spec import CIFAR_BUNDLE_STATS
    for classes in (10, 100):
        recipe, why = choose_recipe(InputSpec(3, 32, *CIFAR_BUNDLE_STATS[classes], classes))
        assert recipe.name == f"cifar{classes}" and "not measured on CIFAR" in why
        assert choose_recipe(InputSpec(3, 64, *CIFAR_BUNDLE_STATS[classes], classes))[0].name == "small-rgb"
    assert choose_recipe(InputSpec(3, 32, *CIFAR_BUNDLE_STATS[10], 100))[0].name == "small-rgb"   # stats of another
    # an MNIST-M teacher of the older CIFAR ResNets (their own std) keeps the recipe measured on it
    assert choose_recipe(InputSpec(3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10))[0].name == "small-rgb"


def test_every_shipped_recipe_parses_for_every_method():
    assert shipped_names() == ["cifar10", "cifar100", "imagenet", "small-grey", "small-rgb"]
    spec = InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3, 10)
    for name in shipped_names():
        recipe = load_recipe(name)
        assert recipe.description and set(recipe.method) <= set(METHODS)
        for method in METHODS:
            cfg = resolve_recipe(GenerateConfig(teacher="x", recipe=name, method=method), spec).config
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
    from dfkd.common.options import explicit_values, hashed, parse_value, resumable

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



def test_one_settings_diff_serves_both_stages():
    """options.differences: the hashed options that differ (declaration order; tuples equal to the lists a
    JSON record holds; a setting missing from an old record taking its default); without a class, every
    key of either mapping. Both stages' refusals are made of it."""
    from dfkd.distill.config import changed_settings

    old = {"epochs": 10, "lr": 0.05, "workers": 2, "out": "a"}  # no `mixup`: written before it existed
    new = {"epochs": 10, "lr": 0.2, "workers": 2, "out": "b", "mixup": 0.0, "loss": "kd", "temperature": 4.0}
    assert [str(c) for c in changed_settings(old, new)] == ["lr 0.05 -> 0.2"]
    assert [c.name for c in changed_settings({"mixup": 1.0, "temperature": 2.0}, new)] == ["lr", "mixup", "temperature"]
    assert [c.name for c in changed_settings({"batch_size": 8}, new | {"batch_size_per_rank": 128})] == [
        "batch_size_per_rank", "lr"]   # a record of an older version, under today's names
    assert options.differences({"scales": [0.5, 1.0]}, {"scales": (0.5, 1.0)}) == []
    assert [(c.name, c.old, c.new) for c in options.differences({"a": 1, "b": 2}, {"b": 3, "c": 4})] == [
        ("a", 1, None), ("b", 2, 3), ("c", None, 4)]


# --------------------------------------------------------------------------- stage two
def _manifest(spec: InputSpec = MNIST_SPEC, recipe: dict | None = None):
    teacher = TeacherRecord("lenet5", "none", None, "0" * 64, spec.to_dict())
    return build_manifest(teacher, method="test", config={}, image_format="npy", planned_samples=0, shard_size=1,
                          recipe=recipe)


def _run(manifest, **given):
    return resolve_recipe(TrainConfig(shards="s", student="lenet5_half", out="o", **given), manifest=manifest)


def test_one_recipe_resolver_serves_both_stages():
    """common.recipes.apply_recipe resolves both stages (explicit > the recipe's table > declared default);
    each stage only picks its recipe and its table."""
    from dfkd.common.recipes import Resolved

    synth = resolve_recipe(GenerateConfig(teacher="lenet5", num_images=7), MNIST_SPEC)
    run = _run(_manifest(), epochs=3)
    assert isinstance(synth, Resolved) and isinstance(run, Resolved)
    assert synth.given == {"teacher", "num_images"} and synth.where == "recipe small-grey.toml [synth]"
    assert (synth.config.num_images, synth.config.shard_size) == (7, 4000)  # given, the recipe's
    assert run.where == "recipe small-grey.toml [distill]" and (run.config.epochs, run.config.lr) == (3, 0.05)
    assert run.record()["name"] == "small-grey" and synth.record()["reason"].startswith("recipe: small-grey")


def test_distill_auto_takes_the_shards_recipe_else_the_teachers_input():
    made = load_recipe("small-rgb").record("recipe: small-rgb (--recipe small-rgb)")
    run = _run(_manifest(recipe=made))  # a grey teacher, but the shards were made with small-rgb: that one
    assert run.recipe.name == "small-rgb" and run.reason == "recipe: small-rgb (auto: the recipe the shards were made with)"
    rgb, grey = load_recipe("small-rgb").distill, load_recipe("small-grey").distill
    assert run.config.aug == rgb["aug"] != grey["aug"]   # the shards' recipe, not the one the grey teacher gets
    assert (run.config.epochs, run.config.lr, run.config.mixup) == (rgb["epochs"], rgb["lr"], rgb["mixup"])
    old = made | {"sha256": "1" * 64}
    assert "made with an earlier version of it" in _run(_manifest(recipe=old)).reason
    for recipe in (None, {"name": "gone", "path": "/nowhere/gone.toml", "sha256": "2" * 64}):
        run = _run(_manifest(recipe=recipe))  # chosen from the teacher's input
        assert run.recipe.name == "small-grey" and run.reason.startswith("recipe: small-grey (auto: 1-channel 28 px")
        assert ("'gone' is not here" in run.reason) == (recipe is not None and recipe["name"] == "gone")
        assert (run.config.epochs, run.config.lr, run.config.mixup, run.config.aug) == (grey["epochs"], 0.05, 1.0, "translate")
    rgb = _run(_manifest(InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3, 10)))
    assert rgb.recipe.name == "small-rgb" and rgb.config.aug == "crop-colour"
    # shards made with --recipe none: distilled with none too (the declared defaults), not small-grey
    plain = _run(_manifest(recipe=load_recipe("none").record("recipe: none (--recipe none: the declared defaults)")))
    assert plain.recipe.name == "none" and plain.reason == ("recipe: none (auto: the shards were made with --recipe "
                                                            "none: the declared defaults)")
    assert (plain.config.epochs, plain.config.lr, plain.config.mixup) == (10, 0.1, 0.0)  # sgd's lr filled in
    assert plain.config == replace(_run(_manifest(), recipe="none").config, recipe="auto")


def test_distill_explicit_beats_recipe_and_none_or_a_file():
    run = _run(_manifest(), lr=0.2, mixup=0.0, epochs=3)
    assert (run.config.lr, run.config.mixup, run.config.epochs, run.plugin.temperature) == (0.2, 0.0, 3, 4.0)
    plain = _run(_manifest(), recipe="none").config
    assert (plain.lr, plain.mixup, plain.epochs) == (0.1, 0.0, 10)   # sgd's lr filled in
    assert _run(_manifest(), recipe="none").reason == "recipe: none (--recipe none: the declared defaults)"

    stored = _run(_manifest(), teacher_logits="stored")  # the stored logits are of the un-augmented image
    assert (stored.config.aug, stored.config.mixup, stored.config.lr) == ("none", 0.0, 0.05)
    assert stored.reason.endswith("; --teacher-logits stored: aug none, mixup 0.0")
    stored.config.resolved()
    with pytest.raises(UserError, match="--teacher-logits stored trains on the view"):
        _run(_manifest(), teacher_logits="stored", aug="crop").config.resolved()


def test_distill_recipe_file_and_bad_values(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[distill]\nepochs = 2\nbatch-size-per-rank = 8\nopt = "adamw"\n')
    run = _run(_manifest(), recipe=str(path))
    assert (run.config.epochs, run.config.batch_size_per_rank, run.config.opt, run.config.mixup) == (2, 8, "adamw", 0.0)
    assert run.reason == f"recipe: mine (--recipe {path}; not measured yet)"
    path.write_text('[distill]\nepochs = "many"\n')
    with pytest.raises(UserError, match=r"recipe mine.toml \[distill\] epochs expects an integer, got 'many'"):
        _run(_manifest(), recipe=str(path))
    path.write_text('[distill]\nepoch = 3\n')
    with pytest.raises(UserError, match=r"\[distill\]: unknown option 'epoch'; valid options: .*epochs"):
        _run(_manifest(), recipe=str(path))
    path.write_text('[distill]\nopt = "lion"\n')
    with pytest.raises(UserError, match=r"recipe mine.toml \[distill\] opt must be one of sgd, adamw \(got lion\)"):
        _run(_manifest(), recipe=str(path))


def test_distill_cli_without_flags_uses_the_recipe_and_records_it(tiny_teacher_path, tmp_path):
    """The new user's two commands: the shards' recipe (small-grey) sets stage two, config.json says so."""
    assert _generate(tiny_teacher_path, tmp_path / "s", "--shard-size", "8").exit_code == 0
    result = CliRunner().invoke(distill_cli, ["train", "--shards", str(tmp_path / "s"), "--student", "lenet5_half",
                                              "--out", str(tmp_path / "run"), "--epochs", "1", "--workers", "0",
                                              "--batch-size-per-rank", "8", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "recipe: small-grey (auto: the recipe the shards were made with)" in result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["lr"], saved["mixup"], saved["epochs"], saved["workers"], saved["recipe"]) == (0.05, 1.0, 1, 0, "auto")
    assert saved["temperature"] == 4.0 and saved["batch_size_per_rank"] == 8
    assert saved["recipe_used"]["name"] == "small-grey" and len(saved["recipe_used"]["sha256"]) == 64
    # a resume resolves the same recipe: accepted; a changed option is refused by name
    again = CliRunner().invoke(distill_cli, ["train", "--shards", str(tmp_path / "s"), "--student", "lenet5_half",
                                             "--out", str(tmp_path / "run"), "--epochs", "1", "--workers", "0",
                                             "--batch-size-per-rank", "8", "--resume", "--quiet", "--recipe", "none"])
    assert again.exit_code == 2 and "other settings (" in again.output and "lr 0.05 -> 0.1" in again.output, again.output


def test_distill_cli_options_come_from_the_declarations():
    """Every `distill train` / `distill teacher` flag of a config option defaults to None (unset: the
    recipe or the declaration decides) and shows the declared default; the CLI module writes no default."""
    for cls, command in ((TrainConfig, train_command), (TeacherConfig, teacher_command)):
        flags = {p.name: p for p in command.params}
        for spec in options.options_of(cls):
            if spec.cli:
                assert flags[spec.name].default is None, spec.name
                assert spec.help in flags[spec.name].help, spec.name
                if not spec.required:
                    assert f"default: {options._show(spec.default)}" in flags[spec.name].help, spec.name
        losses = {s.name for loss in LOSSES.values() for s in options.options_of(loss.Config)} if cls is TrainConfig else set()
        for spec in (s for loss in LOSSES.values() for s in options.options_of(loss.Config) if cls is TrainConfig):
            assert flags[spec.name].default is None and spec.help in flags[spec.name].help, spec.name  # a loss's own
        assert set(flags) - {s.name for s in options.options_of(cls)} == {"threads", "quiet"} | losses
    import inspect

    from dfkd.distill import cli as distill_cli

    source = inspect.getsource(distill_cli)
    train_part = source[source.index('@main.command("train"'):source.index('@main.command("export"')]
    assert "default=" not in train_part.replace("default=None", "")


def test_the_mnistm_benchmark_measures_what_a_user_without_flags_gets(load_pipeline):
    """The MNIST-M rows run the small-rgb recipe that `synth generate` picks for a 3-channel 32 px
    teacher: same image count and method options for each method, and `distill train` gets its schedule."""
    bench = load_pipeline("bench_methods")
    spec = InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3, 10)
    for variant in ("generator ensemble", "muse", "deepinversion"):
        method, row = bench.variant_options("mnistm32", variant)
        user = resolve_recipe(GenerateConfig(teacher="cifar_resnet20", method=method), spec)
        assert user.recipe.name == "small-rgb"
        assert bench.CONFIGS["mnistm32"]["images"] == user.config.num_images
        assert parse_config(METHODS[method].Config, row) == parse_config(METHODS[method].Config,
                                                                          user.config.method_options), variant
    flags = bench.distill_options("mnistm32")
    for key, value in load_recipe("small-rgb").distill.items():
        assert flags[key.replace("_", "-")] == value, key
    # a configuration's own value wins over its recipe (mnistm64: MUSE's equal-cost generator count, the budget)
    assert bench.variant_options("mnistm64", "muse")[1]["num_generators"] == 6
    assert (bench.CONFIGS["mnistm64"]["images"], bench.CONFIGS["mnistm64"]["distill_epochs"]) == (10_000, 5)
    assert bench.distill_options("mnistm64")["aug"] == load_recipe("small-rgb").distill["aug"]
    # a row's pinned option (what the row is about) wins over the recipe's table, and a configuration's
    # per-row options over both
    assert bench.variant_options("mnistm32", "muse")[1]["teacher_input"] == "native"
    assert bench.variant_options("mnistm32", "muse, full-size teacher view")[1]["teacher_input"] == "upsampled"
    _, full_view = bench.variant_options("mnistm64", "muse, full-size teacher view")
    assert (full_view["teacher_input"], full_view["num_generators"], full_view["steps"]) == ("upsampled", 3, 70)
    assert bench.variant_options("mnistm64", "generator ensemble")[1] == bench.variant_options("mnistm32", "generator ensemble")[1]
    # a variant's own option survives the recipe's table
    assert bench.variant_options("mnistm32", "generator ensemble + adversarial")[1]["adversarial_weight"] == 1.0
    # mnistm32-methods (every method at about equal CPU): mnistm32's settings for the ensemble and DeepInversion, MUSE
    # and its one-switch ablations at 6 generators per resolution, the single-resolution ablations at their own 3
    for variant in ("generator ensemble", "deepinversion", "generator ensemble + adversarial"):
        assert bench.variant_options("mnistm32-methods", variant) == bench.variant_options("mnistm32", variant)
    for variant in ("muse", "muse without CAM", "muse without embedding diversity"):
        assert bench.variant_options("mnistm32-methods", variant)[1]["num_generators"] == 6, variant
    for variant in ("muse without multi-resolution (3 x full)", "muse low-resolution only (3 x 1/4)"):
        assert bench.variant_options("mnistm32-methods", variant)[1]["num_generators"] == 3, variant
    methods = bench.CONFIGS["mnistm32-methods"]
    assert (methods["data"], methods["teacher"], methods["teacher_epochs"], methods["student"]) == tuple(
        bench.CONFIGS["mnistm32"][k] for k in ("data", "teacher", "teacher_epochs", "student"))
    assert methods["separate"] and (methods["images"], methods["distill_epochs"]) == (10_000, 5)


def test_a_set_key_no_rows_method_has_is_refused_before_any_work(tmp_path, monkeypatch, capsys, load_pipeline):
    """bench_methods --set: a key no row's method knows (a typo) stops the run with the known keys, instead of being
    dropped from every row; the keys the GPU check's dry run passes (each known to some method) are accepted."""
    import sys

    bench = load_pipeline("bench_methods")
    monkeypatch.setattr(bench, "run", lambda cmd, log: pytest.fail(f"ran {cmd}"))
    monkeypatch.setattr(sys, "argv", ["bench_methods.py", "--configs", "mnistm32", "--out", str(tmp_path / "out"),
                                      "--set", "steps=2", "--set", "stpes=2"])
    with pytest.raises(SystemExit, match=r"--set stpes: no row's method has such an option; the options are .*steps"):
        bench.main()
    assert not (tmp_path / "out").exists()
    gpu_check = load_pipeline("gpu_check")
    given = gpu_check.DRY.e_common
    sets = dict(given[i + 1].split("=", 1) for i, a in enumerate(given) if a == "--set")
    assert {"steps", "iterations", "low_res_iterations"} <= set(sets)
    bench.check_sets(sets)


def test_a_variant_that_names_no_row_or_runs_on_none_of_the_configurations_is_refused(tmp_path, monkeypatch,
                                                                                        load_pipeline):
    """bench_methods --variants: a slug that is no row, or a row none of the chosen configurations runs (not in a
    test bed's "only" list), stops the run before any work with what to choose, instead of finishing with an empty
    table; a row the test beds list (twice the epochs) runs there."""
    import sys

    bench = load_pipeline("bench_methods")
    monkeypatch.setattr(bench, "run", lambda cmd, log: pytest.fail(f"ran {cmd}"))
    for variants, error in (("generator-ensembel", r"unknown variant\(s\) \['generator-ensembel'\]; choose from .*"
                                                   r"'generator-ensemble'"),
                            ("generator-ensemble-half-the-epochs", r"run on none of the configurations \['mnistm100'\]")):
        monkeypatch.setattr(sys, "argv", ["bench_methods.py", "--configs", "mnistm100", "--out", str(tmp_path / "out"),
                                          "--variants", variants])
        with pytest.raises(SystemExit, match=error):
            bench.main()
    assert not (tmp_path / "out").exists()
    assert all(bench.runs_on(c, "generator ensemble, twice the epochs")
               for c in ("mnistm32", "mnistm100", "mnistm-grey", "mnistm100-grey"))


def test_an_architecture_override_replaces_the_titles_pair_instead_of_following_it(load_pipeline):
    """--teacher-arch / --student-arch: the table's title names the pair that ran, once (not the configuration's
    default pair with the override after it); a title that names no pair gets it appended."""
    bench = load_pipeline("bench_methods")
    title = bench.CONFIGS["mnistm100"]["title"]
    new = bench.retitled(title, "cifar_resnet20", "cifar_resnet8", "cifar_resnet14", "cifar_resnet8")
    assert "cifar_resnet14 -> cifar_resnet8" in new and "cifar_resnet20" not in new
    assert new.startswith("MNIST-M digit pairs (100 classes)")
    papers = bench.CONFIGS["mnistm32-papers"]
    assert bench.retitled(papers["title"], papers["teacher"], papers["student"], "wrn_40_2", "wrn_16_1") == (
        f"{papers['title']}: wrn_40_2 -> wrn_16_1")


def _recording(bench, monkeypatch) -> list:
    """bench.run replaced by a recorder of its command lines (1 s wall, 2 CPU-s each); a run counts as finished
    once a command named its folder."""
    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        return 1.0, 2.0
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "final_top1",
                        lambda run_dir, epochs: 50.0 if any(str(run_dir) in c for c in commands) else None)
    return commands


def test_the_selection_rows_synthesise_as_the_ensemble_plus_select_flags_where_listed(tmp_path, monkeypatch, load_pipeline):
    """The two --select rows run on the harder test beds only (mnistm-grey, mnistm100, mnistm100-grey; they and the stopping rule's rows, listed nowhere
    else, stay off the default configurations); their `synth generate` is the ensemble row's plus --select and --oversample as flags, not
    --set (they are not method options)."""
    bench = load_pipeline("bench_methods")
    rows = {"generator ensemble, boundary selection (2x candidates)": "boundary",
            "generator ensemble, confident selection (2x candidates)": "confident"}
    for config in bench.CONFIGS:
        assert all(bench.runs_on(config, row) == (config in ("mnistm-grey", "mnistm100", "mnistm100-grey"))
                   for row in rows), config
    assert [r for r in bench.ROWS if r not in bench.LISTED_ONLY and bench.runs_on("mnistm32", r)] == [
        r for r in bench.ROWS if r not in bench.LISTED_ONLY and r not in bench.CONFIGS["mnistm32"].get("skip", [])]
    assert not any(bench.runs_on("mnistm32", r) for r in bench.LISTED_ONLY)
    commands = _recording(bench, monkeypatch)
    for row in ("generator ensemble", *rows):
        bench.bench_variant("python", tmp_path, "mnistm-grey", row, [0], "data")
    synths = [c for c in commands if c[1:4] == ["-m", "dfkd.synth", "generate"]]
    plain, *selecting = synths
    for cmd, mode in zip(selecting, rows.values()):
        at = cmd.index("--select")
        assert cmd[at:at + 4] == ["--select", mode, "--oversample", "2"]
        rest = cmd[:at] + cmd[at + 4:]
        assert [a for a in rest if "shards" not in a] == [a for a in plain if "shards" not in a]   # but --out
        assert not any(a.startswith(("select=", "oversample=")) for a in cmd)


def test_a_stage_two_row_distils_the_shards_of_its_row_with_its_own_flags(tmp_path, monkeypatch, load_pipeline):
    """"muse, teacher on native views in stage two" synthesises nothing: it distils the "muse" row's shards
    (whose synthesis columns it reports) with --teacher-view native, into its own run folders."""
    bench = load_pipeline("bench_methods")
    commands = _recording(bench, monkeypatch)
    row = "muse, teacher on native views in stage two"
    muse_shards = tmp_path / "mnistm64" / "shards" / "muse"
    muse_shards.mkdir(parents=True)
    (muse_shards / "bench_timing.json").write_text('{"wall_s": 30.0, "cpu_s": 40.0}')
    result = bench.bench_variant("python", tmp_path, "mnistm64", row, [0], "data")
    assert len(commands) == 1 and commands[0][1:4] == ["-m", "dfkd.distill", "train"]   # no synthesis of its own
    cmd = commands[0]
    assert cmd[cmd.index("--shards") + 1] == str(muse_shards)
    assert cmd[cmd.index("--teacher-view") + 1] == "native"
    assert cmd[cmd.index("--out") + 1].endswith("muse-teacher-on-native-views-in-stage-two-seed0")
    assert (result["cpu_s"], result["method"], result["top1"]) == (40.0, row, {0: 50.0})
    assert result["distill_cpu_s"] == 2.0   # the distillation's own CPU, for the total-CPU column
    assert row not in [v for v in bench.ROWS if v not in bench.CONFIGS["mnist28"]["skip"]]   # LeNet-5: 28 px only


def test_an_epochs_row_scales_the_distillation_and_a_resumed_run_records_no_cpu(tmp_path, monkeypatch, load_pipeline):
    """"twice the epochs" distils the ensemble's shards for 2x the configuration's epochs and judges the run
    complete at that epoch; a run resumed from a checkpoint has no whole CPU figure, so none is recorded."""
    bench = load_pipeline("bench_methods")
    commands, asked = [], []

    def fake_run(cmd, log):
        commands.append(cmd)
        return 1.0, 7.0

    def fake_final(run_dir, epochs):
        asked.append(epochs)
        return 50.0 if commands else None
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "final_top1", fake_final)
    shards = tmp_path / "mnistm32" / "shards" / "generator-ensemble"
    shards.mkdir(parents=True)
    (shards / "bench_timing.json").write_text('{"wall_s": 30.0, "cpu_s": 40.0}')
    result = bench.bench_variant("python", tmp_path, "mnistm32", "generator ensemble, twice the epochs", [0], "data")
    epochs = 2 * bench.CONFIGS["mnistm32"]["distill_epochs"]
    assert commands[0][commands[0].index("--epochs") + 1] == str(epochs) and set(asked) == {epochs}
    assert (result["epochs"], result["distill_cpu_s"]) == (epochs, 7.0)
    commands.clear()
    resumed = tmp_path / "mnistm32" / "runs" / "generator-ensemble-twice-the-epochs-seed1"
    resumed.mkdir(parents=True)
    (resumed / "checkpoint.pt").write_bytes(b"")
    result = bench.bench_variant("python", tmp_path, "mnistm32", "generator ensemble, twice the epochs", [1], "data")
    assert "--resume" in commands[0] and result["distill_cpu_s"] is None


def test_distill_set_flags_go_to_every_row_and_a_rows_own_flags_win(tmp_path, monkeypatch, load_pipeline):
    """--distill-set aug=translate reaches every row's `distill train`, over the configuration's own value;
    a stage-two row's own flag (cutmix's --mixup 0) still wins over it."""
    bench = load_pipeline("bench_methods")
    commands = _recording(bench, monkeypatch)
    monkeypatch.setattr(bench, "DISTILL_SETS", {"aug": "translate", "mixup": "0.5"})
    shards = tmp_path / "mnistm32" / "shards" / "generator-ensemble"
    shards.mkdir(parents=True)
    (shards / "bench_timing.json").write_text('{"wall_s": 30.0, "cpu_s": 40.0}')
    assert bench.CONFIGS["mnistm32"]["distill"]["aug"] != "translate"
    bench.bench_variant("python", tmp_path, "mnistm32", "generator ensemble", [0], "data")
    bench.bench_variant("python", tmp_path, "mnistm32", "generator ensemble, cutmix instead of mixup", [0], "data")
    plain, cutmix = commands
    assert plain[plain.index("--aug") + 1] == "translate" and plain[plain.index("--mixup") + 1] == "0.5"
    assert cutmix[cutmix.index("--aug") + 1] == "translate" and cutmix[cutmix.index("--mixup") + 1] == "0.0"


def test_a_finished_run_or_shard_folder_of_other_settings_is_not_reused(tmp_path, monkeypatch, load_pipeline):
    """The same --out with another aug (a recipe change, --distill-set) or another image count must not fill a
    row with runs or shards made otherwise: a one-line error names what differs."""
    bench = load_pipeline("bench_methods")
    monkeypatch.setattr(bench, "run", lambda cmd, log: (_ for _ in ()).throw(AssertionError(f"ran {cmd}")))
    monkeypatch.setattr(bench, "final_top1", lambda run_dir, epochs: 50.0)
    shards = tmp_path / "mnistm32" / "shards" / "generator-ensemble"
    shards.mkdir(parents=True)
    (shards / "bench_timing.json").write_text('{"wall_s": 30.0, "cpu_s": 40.0}')
    (shards / "manifest.json").write_text(json.dumps({"planned_samples": bench.CONFIGS["mnistm32"]["images"]}))
    run = tmp_path / "mnistm32" / "runs" / "generator-ensemble-seed0"
    run.mkdir(parents=True)
    flags = bench.distill_options("mnistm32")
    (run / "config.json").write_text(json.dumps({"aug": flags["aug"], "mixup": float(flags["mixup"]),
                                                 "epochs": flags["epochs"], "workers": 2}))
    assert bench.bench_variant("python", tmp_path, "mnistm32", "generator ensemble", [0], "data")["top1"] == {0: 50.0}
    monkeypatch.setattr(bench, "DISTILL_SETS", {"aug": "none"})
    with pytest.raises(SystemExit, match=r"trained with other flags \(--aug .* there, none here\)"):
        bench.bench_variant("python", tmp_path, "mnistm32", "generator ensemble", [0], "data")
    monkeypatch.setattr(bench, "DISTILL_SETS", {})
    (shards / "manifest.json").write_text(json.dumps({"planned_samples": 123}))
    with pytest.raises(SystemExit, match="holds 123 images"):
        bench.bench_variant("python", tmp_path, "mnistm32", "generator ensemble", [0], "data")


def test_paired_seeds_synthesise_once_per_seed_and_distil_from_their_own_shards(tmp_path, monkeypatch, load_pipeline):
    """--paired-seeds: seed S synthesises with --seed S into its own folder (seed 0 keeps the unpaired folder and
    run, so earlier results are reused) and distils from it with --seed S; the ceiling keeps its one subset."""
    bench = load_pipeline("bench_methods")
    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        return 1.0, 10.0 * len(commands)
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "final_top1", lambda run_dir, epochs: 50.0)
    row = "generator ensemble + adversarial"
    result = bench.bench_variant("python", tmp_path, "mnistm32", row, [0, 1, 2], "data", paired=True)
    synths = [c for c in commands if c[1:4] == ["-m", "dfkd.synth", "generate"]]
    assert [c[c.index("--seed") + 1] for c in synths] == ["0", "1", "2"]
    base = tmp_path / "mnistm32" / "shards"
    assert [c[c.index("--out") + 1] for c in synths] == [str(base / "generator-ensemble-adversarial"),
                                                        str(base / "generator-ensemble-adversarial-synth1"),
                                                        str(base / "generator-ensemble-adversarial-synth2")]
    assert result["syntheses"] == 3 and result["cpu_s"] == 20.0   # the mean of the three (10, 20, 30)
    # cached: a rerun synthesises nothing
    commands.clear()
    bench.bench_variant("python", tmp_path, "mnistm32", row, [0, 1, 2], "data", paired=True)
    assert not [c for c in commands if c[1:4] == ["-m", "dfkd.synth", "generate"]]
    # unpaired: one synthesis (seed 0) for every distillation seed
    assert [bench.synth_seed_of(s, False, "generator") for s in (0, 1, 2)] == [0, 0, 0]
    assert [bench.synth_seed_of(s, True, "real") for s in (0, 1, 2)] == [0, 0, 0]
    assert bench.run_name(row, 2, 2) == "generator-ensemble-adversarial-synth2-seed2"
    assert bench.run_name(row, 2, 0) == "generator-ensemble-adversarial-seed2"


def test_a_resumed_synthesis_records_no_cpu_and_the_row_shows_none(tmp_path, monkeypatch, load_pipeline):
    """A synthesis into a folder a stopped run left files in resumes it: the child's CPU covers only the rest, so
    the row's synthesis and total cells stay empty (not a part passed off as the whole); a fresh one is timed."""
    bench = load_pipeline("bench_methods")
    monkeypatch.setattr(bench, "run", lambda cmd, log: (5.0, 7.0))
    monkeypatch.setattr(bench, "final_top1", lambda run_dir, epochs: 50.0)
    monkeypatch.setattr(bench, "DISTILL_SETS", {})
    row = "generator ensemble"
    partial = bench.shards_folder(tmp_path / "mnistm32", row, 1)
    partial.mkdir(parents=True)
    (partial / "shard-000000.tar").write_bytes(b"")      # what a stopped synthesis left
    result = bench.bench_variant("python", tmp_path, "mnistm32", row, [0, 1], "data", paired=True)
    assert json.loads((partial / "bench_timing.json").read_text())["cpu_s"] is None
    assert json.loads((bench.shards_folder(tmp_path / "mnistm32", row, 0) / "bench_timing.json").read_text()) == \
        {"wall_s": 5.0, "cpu_s": 7.0}
    assert result["cpu_s"] is None and result["wall_s"] is None
    bench.write_results(tmp_path, [{**result, "teacher_top1": 99.0}], 60.0, 1, paired=True)
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith(f"| {row} |"))
    assert line.split(" | ")[2:5] == ["-", "-", "-"], line
    csv_row = (tmp_path / "results.csv").read_text().splitlines()[1].split(",")
    assert csv_row[3:6] == ["", "", ""] and csv_row[12] == ""


def test_generate_builds_the_teacher_once(tiny_teacher_path, tmp_path, monkeypatch):
    """The teacher is built once: after the recipe is resolved for a named recipe (one that sets the seed
    here, which random weights depend on), before it for the automatic one, which chooses among shipped
    recipes that never set how the teacher is built."""
    import dfkd.synth.generate as gen

    for name in shipped_names():
        assert not set(load_recipe(name).synth) & set(gen._TEACHER_FIELDS), name
    built = []
    real = gen.create_model
    monkeypatch.setattr(gen, "create_model", lambda *a, **k: built.append(k) or real(*a, **k))
    path = tmp_path / "seeded.toml"
    path.write_text("[synth]\nseed = 3\nnum_classes = 4\n")
    small = dict(teacher="lenet5", weights="none", num_images=8, shard_size=8, val_images=0, write_workers=0,
                 method="noise", progress=False)
    manifest = generate(GenerateConfig(recipe=str(path), out=str(tmp_path / "named"), **small))
    assert len(built) == 1 and built[0]["num_classes"] == 4 and manifest.config["seed"] == 3
    torch_seeded = generate(GenerateConfig(recipe="none", seed=3, num_classes=4, out=str(tmp_path / "plain"), **small))
    assert torch_seeded.config["teacher_sha256"] == manifest.config["teacher_sha256"]  # the recipe's seed built it
    built.clear()
    generate(GenerateConfig(out=str(tmp_path / "auto"), **small))
    assert len(built) == 1


def test_method_options_are_parsed_once_into_the_methods_dataclass(tiny_teacher_path, tmp_path, monkeypatch):
    """--set values over the recipe's method table are parsed once, when the config is resolved, into the
    method's declared options dataclass; the method gets that object (nothing parses them again)."""
    from dfkd.synth import methods as synth_methods

    resolved = resolve_recipe(GenerateConfig(teacher="lenet5", method_options={"steps": "3", "width": "4"}),
                              MNIST_SPEC)
    config = resolved.plugin
    assert type(config) is METHODS["generator"].Config
    assert (config.steps, config.width, config.num_generators, config.lr) == (3, 4, 8, 0.01)  # --set, recipe, default
    assert resolved.config.method_options["steps"] == "3"  # as given: the manifest records the options so
    with pytest.raises(UserError, match="--set steps expects an integer, got 'many'"):
        resolve_recipe(GenerateConfig(teacher="lenet5", method_options={"steps": "many"}), MNIST_SPEC)
    with pytest.raises(UserError, match="generator option width must be at least"):
        resolve_recipe(GenerateConfig(teacher="lenet5", method_options={"width": "0"}), MNIST_SPEC)

    def parsed_again(*args, **kwargs):
        raise AssertionError("method options parsed a second time")
    monkeypatch.setattr(synth_methods, "parse_config", parsed_again)
    manifest = generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(tmp_path / "o"),
                                       num_images=16, val_images=0, write_workers=0, progress=False,
                                       method_options={"num_generators": "1", "steps": "1", "train_batch_size": "8",
                                                       "width": "4"}))
    assert manifest.options["method"]["width"] == 4 and manifest.options["generate"]["method_options"]["width"] == "4"


def test_the_papers_architectures_on_mnistm_take_the_recipe_their_teacher_gets_without_flags(tmp_path, monkeypatch, load_pipeline):
    """bench_methods' mnistm32-papers: "auto" resolves the recipe `synth generate` gives its teacher (cifar10 for the
    papers' architectures, which carry the CIFAR bundle's normalisation), after --teacher-arch / --student-arch."""
    import copy
    import sys

    bench = load_pipeline("bench_methods")
    cfg = copy.deepcopy(bench.CONFIGS["mnistm32-papers"])
    assert cfg["recipe"] == "auto" and "distill_epochs" not in cfg   # resolved when the run starts
    bench._apply_recipe(cfg)
    cifar10 = load_recipe("cifar10")
    assert (cfg["images"], cfg["distill_epochs"]) == (cifar10.synth["num_images"], cifar10.distill["epochs"])
    assert cfg["options"]["generator"]["width"] == cifar10.method["generator"]["width"]
    commands = _recording(bench, monkeypatch)
    monkeypatch.setattr(bench, "teacher_top1", lambda *a, **k: 50.0)
    monkeypatch.setattr(sys, "argv", ["bench_methods.py", "--configs", "mnistm32-papers", "--out", str(tmp_path),
                                      "--teacher-arch", "cifar_resnet34", "--student-arch", "cifar_resnet18",
                                      "--seeds", "1", "--images", "64"])
    monkeypatch.setattr(bench, "write_results", lambda *a, **k: None)
    bench.main()
    flat = [" ".join(c) for c in commands]
    assert any("--model cifar_resnet34" in c for c in flat) and any("--student cifar_resnet18" in c for c in flat)
    assert any("--set width=64" in c and "--num-images 64" in c for c in flat)


def test_a_finished_ceiling_from_a_smaller_split_is_reused_and_another_budget_refused(tmp_path, load_pipeline):
    """The ceiling's real images are at most the training split (MNIST-M: 60,000 for a 96,000 budget): a rerun
    reuses them by the budget they were asked for, and an --out made for another budget is still refused."""
    bench = load_pipeline("bench_methods")
    shards = bench.shards_folder(tmp_path / "mnistm-grey", bench.CEILING, 0)
    shards.mkdir(parents=True)
    (shards / "bench_timing.json").write_text(json.dumps({"wall_s": 3.0, "cpu_s": 2.0}))
    manifest = {"config": {"method": "real-mnistm-train", "num_images": 96000}, "planned_samples": 60000}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert bench.CONFIGS["mnistm-grey"]["images"] == 96000
    assert bench.synthesise("python", tmp_path / "mnistm-grey", "mnistm-grey", bench.CEILING, 0, "data")["cpu_s"] == 2.0
    manifest["config"]["num_images"] = 40000
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="holds 40000 images, this invocation asks for 96000"):
        bench.synthesise("python", tmp_path / "mnistm-grey", "mnistm-grey", bench.CEILING, 0, "data")
