"""`distill report RUN`: a run's training curves as a PNG, and its table.

Reads `metrics.csv` (one row per epoch) and, when present, `steps.csv` (about 20 points per epoch)
and `config.json` from a `distill train` folder; writes `curves.png` with three panels: training loss
(per window and per epoch), top-1 on the evaluation data per epoch (and the student's agreement with the
teacher on the held-out synthetic split, when the run measured it), and the learning rate; a fourth,
KL(teacher || student) on that split, when there is one. The summary names the epoch the validation
signal ranks best (the one `--keep best-val` keeps) and why the run ended: the fixed epochs, the cap, or
the stopping rule on the held-out KL (stopping.py; its trigger as metrics.csv's phase column records it).

    report = report_run("runs/kd")
    print(report.table)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from dfkd.common.errors import UserError
from dfkd.common.plots import Panel, line_panels

from .run_folder import CONFIG_FILE, METRICS_COLUMNS, METRICS_FILE, STEPS_COLUMNS, STEPS_FILE, check_run_folder
from .stopping import StopRule, recorded_trigger, run_end
from .validation import BEST_VAL_FILE, VAL_COLUMNS, best_epoch

CURVES_FILE = "curves.png"


@dataclass
class RunLog:
    metrics: pd.DataFrame               # one row per finished epoch
    steps: pd.DataFrame | None          # windows of steps, if the run wrote them
    config: dict                        # the run's config.json ({} if absent)


@dataclass
class RunReport:
    table: pd.DataFrame
    summary: str
    image: Path


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); is it a file written by `distill train`?") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}: not a file written by `distill train`")
    for column in columns:
        try:
            frame[column] = pd.to_numeric(frame[column])
        except (ValueError, TypeError):
            raise UserError(f"{path}: column {column} holds non-numbers; the file is damaged") from None
    return frame


def read_run(run: str | Path) -> RunLog:
    """The logs of a run folder; UserError when it has none."""
    run = check_run_folder(Path(run), "report")
    if not (run / METRICS_FILE).is_file():
        raise UserError(f"{run} has no {METRICS_FILE}: no epoch has finished there yet, or it is not a "
                        "`distill train` run folder")
    metrics = _read_csv(run / METRICS_FILE, METRICS_COLUMNS)
    if all(c in metrics.columns for c in VAL_COLUMNS):
        metrics = _read_csv(run / METRICS_FILE, METRICS_COLUMNS + VAL_COLUMNS)
    if metrics.empty:
        raise UserError(f"{run / METRICS_FILE} has no rows yet: wait for the first epoch to finish")
    steps = _read_csv(run / STEPS_FILE, STEPS_COLUMNS) if (run / STEPS_FILE).is_file() else None
    try:
        config = json.loads((run / CONFIG_FILE).read_text())
        config = config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        config = {}
    return RunLog(metrics, steps, config)


def curve_panels(log: RunLog) -> list[Panel]:
    """Loss, top-1 and learning rate against (fractional) epochs."""
    m = log.metrics
    steps_per_epoch = float(m["step"].iloc[0] / m["epoch"].iloc[0])
    epochs = m["epoch"].astype(float).tolist()
    loss = Panel("training loss", "epoch", markers=False)
    lr = Panel("learning rate", "epoch")
    if log.steps is not None and not log.steps.empty:
        x = (log.steps["step"] / steps_per_epoch).tolist()
        loss.series["every ~5% of an epoch"] = (x, log.steps["train_loss"].tolist())
        lr.series["lr"] = (x, log.steps["lr"].tolist())
    else:
        lr.series["lr (last step of each epoch)"] = (epochs, m["lr"].tolist())
        lr.markers = True
    loss.series["epoch mean"] = ([e - 0.5 for e in epochs], m["train_loss"].tolist())  # at the epoch's middle
    top1 = Panel(f"top-1 on {log.config.get('eval_data') or 'evaluation data'} (%)", "epoch", markers=True)
    values = [None if pd.isna(v) else float(v) for v in m["eval_top1"]]
    if any(v is not None for v in values):
        top1.series["student"] = (epochs, values)
    if not has_val(m):
        return [loss, top1, lr]
    top1.title += " / val agreement"
    top1.series["agreement with the teacher, held-out synthetic"] = (epochs, _values(m["val_agreement"]))
    kl = Panel("KL(teacher || student), held-out synthetic, T = 1", "epoch", markers=True)
    kl.series["student"] = (epochs, _values(m["val_kl"]))
    return [loss, top1, lr, kl]


def _values(column: pd.Series) -> list[float | None]:
    return [None if pd.isna(v) else float(v) for v in column]


def has_val(metrics: pd.DataFrame) -> bool:
    return all(c in metrics.columns for c in VAL_COLUMNS) and not metrics["val_agreement"].isna().all()


def summary_line(log: RunLog) -> str:
    m = log.metrics
    last = m.iloc[-1]
    parts = [f"epoch {int(last['epoch'])}"
             + (f" of {log.config['epochs']}" if isinstance(log.config.get("epochs"), int) else ""),
             f"train loss {last['train_loss']:.4f}"]
    if not m["eval_top1"].isna().all():
        best = m.loc[m["eval_top1"].idxmax()]
        parts.append(f"top-1 {last['eval_top1']:.2f}% (best {best['eval_top1']:.2f}% at epoch {int(best['epoch'])})")
    if has_val(m):
        best = best_epoch(m.to_dict("records"))
        kept = f", kept as {BEST_VAL_FILE}" if log.config.get("keep") == "best-val" else ""
        parts.append(f"val agreement {last['val_agreement']:.2f}% (best-val epoch {int(best['epoch'])}: "
                     f"{best['val_agreement']:.2f}%, KL {best['val_kl']:.4f}{kept})")
    minutes = m["seconds"].sum() / 60
    parts.append(f"{minutes:.1f} min of training, {m['images_per_s'].iloc[-1]:.0f} img/s in the last epoch")
    ended = end_reason(log)
    return "final: " + ", ".join(parts) + (f"; {ended}" if ended else "")


def end_reason(log: RunLog) -> str | None:
    """Why the run ended (stopping.run_end), from config.json's epochs and stopping rule and the trigger that
    metrics.csv records; None for a run that has not ended, or whose config.json is missing."""
    cap = log.config.get("epochs")
    if not isinstance(cap, int):
        return None
    rows = log.metrics.to_dict("records")
    return run_end(int(rows[-1]["epoch"]), cap, StopRule.of_record(log.config), recorded_trigger(rows))


def curves_path(run: Path, out: str | Path | None) -> Path:
    """Where the curves go: RUN/curves.png; `out` a folder (one that exists, or a name without an
    extension, as `distill export --out` takes): out/curves.png; else the image file `out`, whose
    extension must be one Pillow writes."""
    if out is None:
        return run / CURVES_FILE
    out = Path(out)
    if out.is_dir() or not out.suffix:
        return out / CURVES_FILE
    Image.init()
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise UserError(f"--out {out}: no image type has the extension {out.suffix}; give a .png file, or a folder "
                        f"for {CURVES_FILE}")
    return out


def report_run(run: str | Path, out: str | Path | None = None) -> RunReport:
    """Write the curves PNG (default: RUN/curves.png; `out`: a file, or a folder for curves.png) and
    return the table and summary line."""
    run = Path(run)
    log = read_run(run)
    title = f"{run.name}: {log.config.get('student', 'student')} from {Path(str(log.config.get('shards', '?'))).name}"
    image = curves_path(run, out)
    try:
        image.parent.mkdir(parents=True, exist_ok=True)
        line_panels(curve_panels(log), title=title).save(image)
    except OSError as e:
        raise UserError(f"cannot write {image} ({e.strerror or e}); pass --out to a writable file or folder") from None
    table = log.metrics.set_index("epoch")
    return RunReport(table, summary_line(log), image)


def format_table(table: pd.DataFrame) -> str:
    """The per-epoch table as text: 4 significant digits, '-' for no value."""
    return table.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-")
