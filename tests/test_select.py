"""synth generate --select: over-sample, keep per requested slot the candidate the teacher's margin ranks first;
class counts, sizes and determinism as without selection, and the default writes what it always wrote."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd.common.errors import UserError
from dfkd.common.fileio import canonical_json_sha256
from dfkd.common.shards import read_manifest, read_shard, verify_dataset
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.generate import GenerateConfig, generate, shard_batches, teacher_logits_fn
from dfkd.synth.select import candidate_count, choose, margins

TINY = {"num_generators": "2", "steps": "6", "train_batch_size": "20", "width": "4", "latent_dim": "8",
        "feature_diversity_weight": "0.5", "sample_noise_scale": "1.5", "checkpoint_every": "2"}


def _config(teacher, out, **kw):
    base = dict(teacher="lenet5", weights=str(teacher), out=str(out), method_options=dict(TINY), num_images=50,
                shard_size=20, write_batch_size=16, val_images=0, progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def _shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.tar"))}


def _samples(folder):
    return [s for p in sorted(Path(folder).glob("shard-*.tar")) for s in read_shard(p)]


def _stored_margins(samples) -> np.ndarray:
    """Each stored sample's margin by its stored logits: its label's logit minus the largest other."""
    logits = torch.tensor(np.stack([s.logits for s in samples])).float()
    return margins(logits, torch.tensor([s.label for s in samples])).numpy()


# --------------------------------------------------------------------------- the choice itself
def test_choose_keeps_per_class_the_smallest_or_largest_margin_and_fills_from_the_nearest_others():
    # 3 classes; candidates 0-5 of class 0, 6-8 of class 1, 9-10 of class 2. Class 0: four the teacher assigns to
    # it (margins 3, 1, 2, 0.5), two it does not (-1, -4). Class 1: one it assigns (margin 2), two not (-0.5, -3).
    # Class 2: none (-2, -1).
    def row(cls, margin):
        logits = torch.zeros(3)
        logits[cls] = margin if margin > 0 else 0.0
        logits[(cls + 1) % 3] = 0.0 if margin > 0 else -margin
        return logits
    made = [(0, 3.0), (0, 1.0), (0, -1.0), (0, 2.0), (0, 0.5), (0, -4.0), (1, -0.5), (1, 2.0), (1, -3.0),
            (2, -2.0), (2, -1.0)]
    logits = torch.stack([row(c, m) for c, m in made])
    classes = torch.tensor([c for c, _ in made])
    assert torch.allclose(margins(logits, classes), torch.tensor([m for _, m in made]))
    slots = torch.tensor([0, 1, 0, 2])   # two slots of class 0, one of 1, one of 2
    index, filled = choose(logits, classes, slots, "boundary")
    assert index.tolist() == [1, 7, 4, 10] and filled == 1      # class 0: margins 0.5 and 1, in draw order
    index, filled = choose(logits, classes, slots, "confident")
    assert index.tolist() == [0, 7, 3, 10] and filled == 1      # class 0: margins 3 and 2
    # more slots of class 1 than candidates it assigns to 1: the others, nearest (-0.5) first
    index, filled = choose(logits, classes, torch.tensor([1, 1, 2, 2]), "boundary")
    assert index.tolist() == [6, 7, 9, 10] and filled == 3
    with pytest.raises(ValueError, match="fewer candidates"):
        choose(logits, classes, torch.tensor([2, 2, 2]), "boundary")


def test_candidate_count_is_exact_for_decimal_factors():
    assert [candidate_count(10, 1.1), candidate_count(7, 2.0), candidate_count(5, 1.5), candidate_count(3, 1.0)] == [
        11, 14, 8, 3]


# --------------------------------------------------------------------------- written shards
@pytest.fixture(scope="module")
def selected(tiny_teacher_path, tmp_path_factory):
    """The same config written with select none, boundary and confident."""
    base = tmp_path_factory.mktemp("select")
    return {mode: (base / mode, generate(_config(tiny_teacher_path, base / mode, select=mode)))
            for mode in ("none", "boundary", "confident")}


def test_selection_writes_the_planned_images_with_the_class_counts_of_no_selection(selected):
    none_folder, _ = selected["none"]
    plain = _samples(none_folder)
    for mode in ("boundary", "confident"):
        folder, manifest = selected[mode]
        samples = _samples(folder)
        assert manifest.complete and verify_dataset(folder) == []
        assert [s.num_samples for s in manifest.shards] == [20, 20, 10]
        assert [s.key for s in samples] == [s.key for s in plain]
        assert [s.label for s in samples] == [s.label for s in plain]   # every slot keeps its requested class
        assert _shard_bytes(folder) != _shard_bytes(none_folder)
        assert manifest.config["select"] == mode and manifest.options["generate"]["select"] == mode
        assert manifest.options["generate"]["oversample"] == 2.0
        # batches of 16, 4 and 16, 4, 10 (a batch ends with its shard) each draw twice their size
        record = manifest.selection
        assert (record["select"], record["candidates"], record["selected"]) == (mode, 100, 50)
        last = record["shards"]["shard-000002.tar"]
        assert (last["candidates"], last["selected"]) == (20, 10) and sorted(record["shards"]) == [
            s.name for s in manifest.shards]
        assert record["filled"] == sum(c["filled"] for c in record["shards"].values())
        # a filled slot holds an image the teacher assigns to another class: at least as many as the stored
        # logits show (they are the teacher's on the same image; the rest of the slots agree with their class)
        disagree = sum(int(np.argmax(s.logits)) != s.label for s in samples)
        assert abs(disagree - record["filled"]) <= 1
    assert selected["none"][1].selection is None
    assert "selection" not in json.loads((none_folder / "manifest.json").read_text())


def test_boundary_keeps_smaller_margins_than_confident(tiny_teacher_path, tmp_path):
    """The noise method's class is the teacher's argmax, so every candidate is of its class: boundary keeps the
    least certain ones, confident the most certain, and the stored logits show it."""
    stored = {}
    for mode in ("boundary", "confident"):
        manifest = generate(_config(tiny_teacher_path, tmp_path / mode, method="noise", method_options={},
                                    select=mode, num_images=60))
        samples = _samples(tmp_path / mode)
        assert manifest.num_samples == 60 and manifest.selection["filled"] == 0
        assert all(s.logits[s.label] == s.logits.max() for s in samples)   # float16 may tie near the boundary
        stored[mode] = _stored_margins(samples)
    assert np.median(stored["boundary"]) < np.median(stored["confident"])
    assert stored["boundary"].mean() < stored["confident"].mean()


def test_a_redone_shard_has_the_same_bytes_and_counts(selected, tiny_teacher_path, tmp_path):
    folder, manifest = selected["boundary"]
    out = tmp_path / "redo"
    generate(_config(tiny_teacher_path, out, select="boundary"))
    assert _shard_bytes(out) == _shard_bytes(folder)
    (out / "shard-000001.tar").unlink()
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    again = generate(_config(tiny_teacher_path, out, select="boundary"))
    assert _shard_bytes(out) == _shard_bytes(folder) and (out / "shard-000000.tar").stat().st_mtime_ns == kept
    assert again.selection == manifest.selection
    assert (out / "manifest.json").read_text() == (folder / "manifest.json").read_text().replace(str(folder), str(out))


def test_another_selection_into_the_same_folder_is_refused(selected, tiny_teacher_path, tmp_path):
    out = tmp_path / "o"
    generate(_config(tiny_teacher_path, out, select="boundary"))
    with pytest.raises(UserError, match=r'other settings \(--select "boundary" there, "confident" now\)'):
        generate(_config(tiny_teacher_path, out, select="confident"))
    with pytest.raises(UserError, match=r"other settings \(--oversample 2.0 there, 3.0 now\)"):
        generate(_config(tiny_teacher_path, out, select="boundary", oversample=3.0))
    with pytest.raises(UserError, match="--oversample must be at least 1"):
        generate(_config(tiny_teacher_path, tmp_path / "p", select="boundary", oversample=0.5))


def test_no_selection_writes_exactly_the_plain_draws(selected, tiny_teacher_path, tmp_path):
    """select=none (the default) is the path that writes every image drawn: shard 1 rebuilt here from the trained
    method, one plain draw per batch from the shard's RNG, has the bytes `generate` wrote."""
    from dfkd.common.accel import Compute
    from dfkd.common.models import create_model
    from dfkd.synth.generate import Split
    from dfkd.synth.methods import method_from_options
    from dfkd.synth.writer import PixelBatch, pixels_to_uint8, write_shard as write_pixels, WriterPool
    from dfkd.common.shards import sample_key

    folder, manifest = selected["none"]
    cfg = _config(tiny_teacher_path, folder)
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    method = method_from_options("generator", manifest.options["method"], teacher.input_spec, cfg.num_images)
    method.fit(teacher, folder / "state", progress=False, seed=0)
    split = Split(folder, cfg.num_images, cfg.shard_size)
    rng, indices = split.rng(cfg.seed, 1), split.indices(1)

    def plain():
        for first in range(indices.start, indices.stop, cfg.write_batch_size):
            idx = torch.arange(first, min(first + cfg.write_batch_size, indices.stop))
            labels, streams = idx % 10, (idx // 10) % method.num_streams
            pixels = pixels_to_uint8(method.synthesize(labels, streams, rng))
            metas = [{"stream": int(k), "shard_seed": int(rng.initial_seed()), "resolution": 28, "method": "generator"}
                     for k in streams.tolist()]
            yield PixelBatch([sample_key(int(j)) for j in idx], pixels, labels, metas)
    with WriterPool(0) as pool:
        write_pixels(tmp_path / "rebuilt.tar", plain(), teacher_logits_fn(teacher, Compute()), False,
                     manifest.image_format, pool)
    assert (tmp_path / "rebuilt.tar").read_bytes() == (folder / "shard-000001.tar").read_bytes()
    # and the batches `shard_batches` gives without selection are those plain draws
    again = list(shard_batches(cfg, method, split.rng(cfg.seed, 1), indices))
    rebuilt = list(read_shard(tmp_path / "rebuilt.tar"))
    assert torch.equal(torch.cat([b.pixels for b in again]).permute(0, 2, 3, 1),
                       torch.from_numpy(np.stack([s.image for s in rebuilt])))


def test_a_folder_written_before_the_option_existed_continues(selected, tiny_teacher_path, tmp_path):
    """A manifest whose config has no select / oversample (written by an earlier version) is the default's: a
    rerun continues it; asking for a selection there is refused, naming the default."""
    import shutil

    folder, _ = selected["none"]
    out = tmp_path / "old"
    shutil.copytree(folder, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("select", "oversample"):
        del manifest["config"][key]
    manifest["config_sha256"] = canonical_json_sha256(manifest["config"])
    manifest["complete"], manifest["shards"] = False, manifest["shards"][:1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-000002.tar").unlink()
    generate(_config(tiny_teacher_path, out))
    assert _shard_bytes(out) == _shard_bytes(folder) and read_manifest(out).config_sha256 == manifest["config_sha256"]
    with pytest.raises(UserError, match=r'other settings \(--select "none" there, "boundary" now\)'):
        generate(_config(tiny_teacher_path, out, select="boundary"))


def test_the_held_out_split_is_selected_too(tiny_teacher_path, tmp_path):
    manifest = generate(_config(tiny_teacher_path, tmp_path / "v", select="confident", val_images=12))
    val = read_manifest(tmp_path / "v" / "val")
    assert val.num_samples == 12 and val.selection["candidates"] == 24 and val.selection["select"] == "confident"
    assert val.config["select"] == "confident" and manifest.selection["candidates"] == 100
    assert sorted(s.label for s in _samples(tmp_path / "v" / "val")) == sorted(i % 10 for i in range(12))


def test_the_cli_and_inspect_say_what_was_selected(tiny_teacher_path, tmp_path):
    out = tmp_path / "c"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    r = CliRunner().invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                                       "--out", str(out), "--num-images", "30", "--shard-size", "10", "--quiet",
                                       "--val-images", "0", "--select", "boundary", "--oversample", "1.5", *sets])
    assert r.exit_code == 0, r.output
    record = read_manifest(out).selection
    share = 100 * record["filled"] / 30
    line = (f"selected 30 of 45 candidates (boundary); {share:.1f}% of slots filled from images the teacher assigns "
            "to another class")
    assert line in r.output
    r = CliRunner().invoke(synth_cli, ["inspect", str(out), "--out", str(tmp_path / "i")])
    assert r.exit_code == 0 and line in r.output, r.output
    r = CliRunner().invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights", "none", "--out",
                                       str(tmp_path / "x"), "--select", "best"])
    assert r.exit_code == 2 and "'best' is not one of 'none', 'boundary', 'confident'" in r.output


def test_the_estimate_draws_the_candidates_too(tiny_teacher_path, tmp_path, monkeypatch):
    """--estimate times writing batches as the run makes them: with --select, candidates and the teacher's choice."""
    import dfkd.synth.generate as generate_module
    from dfkd.synth.estimate import Estimate

    chosen, original = [], generate_module.select_batch

    def counting(method, labels, *args, **kwargs):
        chosen.append(len(labels))
        return original(method, labels, *args, **kwargs)
    monkeypatch.setattr(generate_module, "select_batch", counting)
    est = generate(_config(tiny_teacher_path, tmp_path / "e", select="boundary", estimate=True))
    assert isinstance(est, Estimate) and est.timed_batches >= 1 and est.writing_s > 0
    assert chosen and not list((tmp_path / "e").glob("shard-*"))
