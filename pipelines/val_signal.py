"""How well the validation signal without real data tracks real test accuracy: Spearman rank correlations
between the held-out synthetic split's columns (val_agreement, -val_kl) and eval_top1, from the
metrics.csv of `distill train --val-shards ... --eval-data ...` runs.

    python pipelines/val_signal.py runs/kd-a runs/kd-b          # run folders or metrics.csv files
    python pipelines/val_signal.py runs/kd-* --csv val_signal.csv
    python pipelines/val_signal.py runs/kd-* --from-epoch 3   # only the epochs after the first steep rise

    python pipelines/val_signal.py runs/bench/*/runs/* --split shards/other-seed   # across runs, one split

Prints, per run, the correlation across its epochs, the epoch `--keep best-val` keeps and what it costs
against the best real epoch (and the same for the epoch the other ranking, the highest val_agreement first, would keep) (top-1 of the kept epoch minus the best top-1: what a peer choosing on the
test set would report); with several runs also the correlation across runs of their final epochs. Spearman
= Pearson of the ranks (ties share their mean rank), so no scipy is needed. A correlation is empty when
one side is constant (no ranking to agree with).

`--split FOLDER` ranks runs that trained without a held-out split (a benchmark's rows): each run's final
student (student.pt) is measured on the one synthetic shard folder FOLDER (`distill.evaluation.measure`, as
`distill train` does every epoch; a folder no run trained on: another synthesis seed or method) and its
val_agreement and val_kl are correlated with the runs' final eval_top1.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from dfkd.distill.validation import best_epoch  # the ranking --keep best-val uses

SIGNALS = {"val_agreement": 1.0, "val_kl": -1.0}  # signal -> sign that makes "higher is better"


def spearman(a: pd.Series, b: pd.Series) -> float | None:
    """Spearman's rho of two equally long series (rows where both are present); None when either side
    is constant or fewer than 3 pairs are left."""
    both = pd.concat([a.reset_index(drop=True), b.reset_index(drop=True)], axis=1).dropna()
    if len(both) < 3 or both.iloc[:, 0].nunique() < 2 or both.iloc[:, 1].nunique() < 2:
        return None
    return float(both.iloc[:, 0].rank().corr(both.iloc[:, 1].rank()))


def read_metrics(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    path = path / "metrics.csv" if path.is_dir() else path
    frame = pd.read_csv(path)
    # a column with no value is as missing (eval_top1 is always a column; without --eval-data it is empty)
    missing = [c for c in ("epoch", "eval_top1", *SIGNALS) if c not in frame.columns or frame[c].isna().all()]
    if missing:
        raise SystemExit(f"{path} lacks {', '.join(missing)}: train with --val-shards and --eval-data")
    return frame


def final_on_split(runs: list[str], split: str, limit: int | None = None) -> pd.DataFrame:
    """Each run's final student measured on the shard folder `split`: one row per run with its final
    eval_top1 and the split's val_agreement and val_kl (the first `limit` shards' images, or all)."""
    import json

    import torch

    from dfkd.common.models import create_model
    from dfkd.common.shards import read_manifest
    from dfkd.distill.evaluation import measure
    from dfkd.distill.validation import ValSet

    manifest = read_manifest(split)
    if limit:
        manifest.shards = manifest.shards[:limit]
    val, rows = ValSet(split, manifest), []
    for run in runs:
        folder = Path(run)
        final = pd.read_csv(folder / "metrics.csv").iloc[-1]
        arch = json.loads((folder / "config.json").read_text()).get("student")
        student = create_model(arch, weights=str(folder / "student.pt"))
        signal = measure(student, val, torch.device("cpu"))
        rows.append({"run": folder.name, "eval_top1": float(final["eval_top1"]), **signal})
    return pd.DataFrame(rows)


def per_run(name: str, m: pd.DataFrame) -> dict:
    row = {"run": name, "epochs": f"{int(m['epoch'].iloc[0])}-{int(m['epoch'].iloc[-1])}"}
    for signal, sign in SIGNALS.items():
        row[f"rho_{signal}"] = spearman(sign * m[signal], m["eval_top1"])
    kept = best_epoch(m.to_dict("records"))
    best_real = m.loc[m["eval_top1"].idxmax()]
    row |= {"kept_epoch": int(kept["epoch"]), "kept_top1": float(kept["eval_top1"]),
            "best_top1_epoch": int(best_real["epoch"]), "best_top1": float(best_real["eval_top1"]),
            "final_top1": float(m["eval_top1"].iloc[-1])}
    row["kept_minus_best"] = row["kept_top1"] - row["best_top1"]
    # the other ranking: the highest agreement first (ties: the lower KL, then the earlier epoch)
    by_agreement = m.sort_values(["val_agreement", "val_kl", "epoch"], ascending=[False, True, True]).iloc[0]
    row |= {"agreement_kept_epoch": int(by_agreement["epoch"]),
            "agreement_kept_minus_best": float(by_agreement["eval_top1"]) - row["best_top1"]}
    return row


def print_across(finals: pd.DataFrame, what: str) -> None:
    """One line: each signal's Spearman rho with eval_top1 over the rows of `finals` (one row per run)."""
    across = {s: spearman(sign * finals[s], finals["eval_top1"]) for s, sign in SIGNALS.items()}
    print(f"across runs ({what}): " + ", ".join(
        f"rho({'-' if sign < 0 else ''}{s}, eval_top1) = {'-' if across[s] is None else f'{across[s]:.3f}'}"
        for s, sign in SIGNALS.items()))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or their metrics.csv)")
    parser.add_argument("--csv", help="also write the per-run table here")
    parser.add_argument("--from-epoch", type=int, default=1,
                        help="leave out the epochs before this one (the first steep rise, which any signal tracks)")
    parser.add_argument("--split", help="measure each run's final student on this synthetic shard folder and "
                        "correlate across runs (runs trained without --val-shards)")
    parser.add_argument("--split-shards", type=int, default=None, help="only the first N shards of --split")
    args = parser.parse_args(argv)
    if args.split:
        table = final_on_split(args.runs, args.split, args.split_shards)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print_across(table, "final students, one split")
        if args.csv:
            table.to_csv(args.csv, index=False)
        return table
    frames = {str(r): read_metrics(r) for r in args.runs}
    frames = {name: m[m["epoch"] >= args.from_epoch].reset_index(drop=True) for name, m in frames.items()}
    empty = [name for name, m in frames.items() if m.empty]
    if empty:
        raise SystemExit(f"{empty[0]} has no epoch from {args.from_epoch} on")
    table = pd.DataFrame([per_run(name, m) for name, m in frames.items()])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    if len(frames) >= 3:
        print_across(pd.DataFrame([m.iloc[-1] for m in frames.values()]), "final epochs")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return table


if __name__ == "__main__":
    main()
