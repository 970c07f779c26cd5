"""A trained student in formats that deploy without this project's code.

    export_run("runs/kd")    # -> runs/kd/export/student.pt2, student.torchscript.pt, (student.onnx), student.json

Formats: `export` (torch.export, loaded with torch.export.load, batch size dynamic), `torchscript`
(torch.jit.trace; loaded with torch.jit.load), `onnx` (torch.onnx.export, only where the `onnx` package is
installed). Every written file is loaded back and run on a check batch (images from the run's shards
when they are local and readable, else seeded random pixels), and its logits must match the trained
model's within `atol` + `rtol` x |logits|; the argmax must agree. The JSON beside them records the
input spec the exported model expects (float32 N x C x H x W, (pixels / 255 - mean) / std), the classes,
each file and its measured largest difference. Every file is written atomically (a temp file renamed
when complete): a full disk leaves no half-written model under a final name, and names the file.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dfkd.common.errors import DiskFullError, UserError
from dfkd.common.faults import fault_point
from dfkd.common.fileio import DISK_FULL_REASONS, temp_path_for, write_bytes_atomic, write_json_atomic
from dfkd.common.models import create_model, load_model_checkpoint

from .run_folder import CONFIG_FILE, EMA_FILE, STUDENT_FILE, check_run_folder

EXPORT_FORMATS = ("export", "torchscript", "onnx")
FILES = {"export": "student.pt2", "torchscript": "student.torchscript.pt", "onnx": "student.onnx"}
SPEC_FILE = "student.json"
CHECK_BATCH = 8


@dataclass
class ExportResult:
    out: Path
    files: dict[str, Path] = field(default_factory=dict)     # format -> file
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)     # format -> why it was not written
    spec_file: Path | None = None


def onnx_available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def default_formats() -> tuple[str, ...]:
    return ("export", "torchscript") + (("onnx",) if onnx_available() else ())


def check_batch(run: Path, spec, size: int = CHECK_BATCH) -> tuple[torch.Tensor, str]:
    """Normalised images to compare outputs on: the run's first shard's first `size` samples, or seeded
    random pixels when the shards are not at hand. Returns (batch, where it came from)."""
    try:
        from dfkd.common.remote import is_remote
        from dfkd.common.shards import read_manifest, read_shard, shard_paths

        shards = json.loads((run / CONFIG_FILE).read_text())["shards"]
        if not is_remote(shards):
            manifest = read_manifest(shards)
            images = []
            for sample in read_shard(shard_paths(shards, manifest)[0], max_pixels=spec.size * spec.size):
                images.append(sample.image)
                if len(images) == size:
                    break
            pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
            if pixels.shape[1:] == (spec.channels, spec.size, spec.size):
                return spec.normalize(pixels), f"the first {len(images)} images of {shards}"
    except Exception:  # shards moved, remote or unreadable: random pixels still check the export
        pass
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(size, spec.channels, spec.size, spec.size, generator=generator)
    return spec.normalize(pixels), "seeded uniform random pixels"


def _compare(name: str, expected: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> float:
    got = torch.as_tensor(got).float()
    if got.shape != expected.shape:
        raise UserError(f"the {name} export returns {tuple(got.shape)} logits, the trained model {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    if not torch.allclose(got, expected, atol=atol, rtol=rtol) or not torch.equal(got.argmax(1), expected.argmax(1)):
        raise UserError(f"the {name} export differs from the trained model by up to {diff:.3g} on the check batch "
                        f"(allowed {atol:g} + {rtol:g} x |logit|); report it, or try another --format")
    return diff


def _export_pt2(model: nn.Module, x: torch.Tensor, path: Path) -> nn.Module:
    from torch.export import Dim, export

    try:
        program = export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=1 << 16)},))
    except Exception:  # a model that specialises on the batch size: export it for this batch size
        program = export(model, (x,))
    buffer = io.BytesIO()  # serialised in memory, written atomically: a full disk is an OSError on our write
    torch.export.save(program, buffer)
    write_bytes_atomic(path, buffer.getbuffer())
    return torch.export.load(str(path)).module()


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.trace(model, x, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        write_bytes_atomic(path, buffer.getbuffer())
        return torch.jit.load(str(path))


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path):
    import onnx

    temp = temp_path_for(path)  # the exporter writes a path: its temp name, renamed once checked
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # torch's torch.export-based exporter needs onnxscript; without it, the TorchScript-based one
            torch.onnx.export(model, (x,), str(temp), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=importlib.util.find_spec("onnxscript") is not None)
        onnx.checker.check_model(onnx.load(str(temp)))
        fault_point(f"commit:{path.name}")
        os.replace(temp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(e, OSError) and e.errno in DISK_FULL_REASONS:
            raise DiskFullError(path, DISK_FULL_REASONS[e.errno]) from None
        raise
    if importlib.util.find_spec("onnxruntime") is None:
        return None  # checked for validity only
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])


def _extra(source: Path) -> dict:
    """What `distill train` recorded with the student (epochs, eval top-1, teacher checksum, shards)."""
    from dfkd.common.fileio import load_torch_safely

    obj = load_torch_safely(source, "export a checkpoint written by `distill train`")
    return obj.get("extra", {}) if isinstance(obj, dict) else {}


def export_run(run: str | Path, out: str | Path | None = None, formats: tuple[str, ...] | None = None,
               ema: bool = False, atol: float = 1e-4, rtol: float = 1e-4) -> ExportResult:
    """Export RUN's student (or its EMA) into `out` (default RUN/export) in `formats` (default: export,
    torchscript, and onnx where installed); UserError when a file cannot be written or its outputs do not
    match the trained model's on the check batch."""
    run = check_run_folder(Path(run), "export")
    source = run / (EMA_FILE if ema else STUDENT_FILE)
    if not source.is_file() and not (run / CONFIG_FILE).is_file() and not (run / STUDENT_FILE).is_file():
        raise UserError(f"{run} is not a `distill train` run folder (it has no {CONFIG_FILE} and no {STUDENT_FILE}); "
                        "give the --out folder of a run")
    if not source.is_file():
        hint = ("the run has no EMA (train with --ema-decay)" if ema and (run / STUDENT_FILE).is_file()
                else "is the run finished? `distill train` writes it after the last epoch")
        raise UserError(f"{source} does not exist: {hint}")
    formats = tuple(formats) if formats else default_formats()
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"unknown export format {unknown[0]!r}; use {', '.join(EXPORT_FORMATS)}")
    if "onnx" in formats and not onnx_available():
        raise UserError("--format onnx needs the onnx package: pip install 'dfkd[onnx]' (or pip install onnx)")
    checkpoint = load_model_checkpoint(source)
    if not checkpoint.get("arch"):
        raise UserError(f"{source} records no architecture; export a checkpoint written by `distill train`")
    model = create_model(checkpoint["arch"], weights=str(source)).eval()
    spec = model.input_spec
    out = Path(out) if out is not None else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    x, batch_source = check_batch(run, spec)
    with torch.no_grad():
        expected = model(x).float()
    result = ExportResult(out)
    writers = {"export": _export_pt2, "torchscript": _export_torchscript, "onnx": _export_onnx}
    for name in formats:
        path = out / FILES[name]
        try:
            loaded = writers[name](model, x, path)
        except DiskFullError as e:
            raise e.with_fix("make room (free space, or raise the quota or limit) and rerun the same `distill export`: "
                             "the files written before it are complete") from None
        except UserError:
            raise
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"cannot export {checkpoint['arch']} as {name} ({type(e).__name__}: {reason}); "
                            f"choose other formats with --format ({', '.join(f for f in EXPORT_FORMATS if f != name)})"
                            ) from None
        result.files[name] = path
        if loaded is None:
            result.skipped[f"{name} check"] = "onnxruntime is not installed: the file was validated, not run"
            continue
        with torch.no_grad():
            result.max_abs_diff[name] = _compare(name, expected, loaded(x), atol, rtol)
    spec_doc = {
        "arch": checkpoint["arch"], "source": str(source.resolve()), "ema": ema,
        "input_spec": spec.to_dict(),
        "input": f"float32 N x {spec.channels} x {spec.size} x {spec.size}, (pixels / 255 - mean) / std per channel",
        "output": f"logits N x {spec.num_classes}",
        "files": {name: path.name for name, path in result.files.items()},
        "check": {"batch": int(x.shape[0]), "source": batch_source, "atol": atol, "rtol": rtol,
                  "max_abs_diff": result.max_abs_diff, "not_checked": result.skipped},
        "trained": _extra(source),
    }
    result.spec_file = out / SPEC_FILE
    try:
        write_json_atomic(result.spec_file, spec_doc)
    except DiskFullError as e:
        raise e.with_fix("make room (free space, or raise the quota or limit) and rerun the same `distill export`") from None
    return result
