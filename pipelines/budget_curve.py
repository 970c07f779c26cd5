"""Student top-1 against total CPU-seconds (synthesis + distillation): the rows of one or more
`pipelines/bench_methods.py` outputs on one configuration, as a table and a chart.

    python pipelines/bench_methods.py --out runs/b --configs mnistm32 --paired-seeds --seeds 3 \\
        --variants generator-ensemble,generator-ensemble-half-the-epochs,generator-ensemble-twice-the-epochs
    python pipelines/bench_methods.py --out runs/b-40k --images 40000 --distill-epochs 5 ...   # another budget
    python pipelines/budget_curve.py runs/b runs/b-40k --config mnistm32 --results results/budget_curve.md

Each row of an output's results.csv (written by bench_methods with its `distill_epochs`, `distill_cpu_s` and
`total_cpu_s` columns) is a point: x the mean total CPU-seconds of its runs, y the mean final top-1 over its
seeds (bars: the seed spread). The "generator ensemble" rows at every image count and epoch count form the
recipe's curve; the other rows are single points beside it. A ceiling row (real images) in any output gives the
"x ceiling" column and the line at 0.97 of it. A row whose runs recorded no distillation CPU (resumed, or run
before the column existed) is listed with no total and left out of the chart.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from results_header import write_results_file

CEILING = "real training images (ceiling)"
TARGET = 0.97   # the share of the real-data ceiling a data-free student is measured against


def read_rows(outs: list[str], config: str) -> pd.DataFrame:
    """The rows of `config` from each output's results.csv, with the output's folder name."""
    frames = []
    for out in outs:
        path = Path(out) / "results.csv"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: run pipelines/bench_methods.py --out {out} first")
        frame = pd.read_csv(path)
        missing = {"distill_epochs", "total_cpu_s"} - set(frame.columns)
        if missing:
            raise SystemExit(f"{path} lacks {', '.join(sorted(missing))}: rerun bench_methods.py (it rewrites the file "
                             "from its finished runs)")
        frame = frame[frame["config"] == config].assign(out=Path(out).name)
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    if rows.empty:
        raise SystemExit(f"no rows of configuration {config} in {', '.join(outs)}")
    rows["seeds"] = rows["student_top1_per_seed"].astype(str).str.split().str.len()
    return rows


def table(rows: pd.DataFrame) -> str:
    ceiling = rows.loc[rows["method"] == CEILING, "student_top1_mean"]
    ceiling = float(ceiling.iloc[0]) if len(ceiling) else None
    lines = ["| row | images x epochs | synthesis CPU-s | distillation CPU-s | total CPU-s | student top-1 (%), mean "
             "+- std (seeds) | per seed |" + (" x ceiling |" if ceiling else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if ceiling else "")]
    for _, r in rows.sort_values(["method", "total_cpu_s"]).iterrows():
        total = "-" if pd.isna(r["total_cpu_s"]) else f"{r['total_cpu_s']:.0f}"
        dist = "-" if pd.isna(r["distill_cpu_s"]) else f"{r['distill_cpu_s']:.0f}"
        ratio = f" {r['student_top1_mean'] / ceiling:.3f} |" if ceiling else ""
        lines.append(f"| {r['method']} | {int(r['images']):,} x {int(r['distill_epochs'])} | {r['synthesis_cpu_s']:.0f} | "
                     f"{dist} | {total} | {r['student_top1_mean']:.2f} +- {r['student_top1_std']:.2f} ({r['seeds']}) | "
                     f"{str(r['student_top1_per_seed']).replace(' ', ' / ')} |{ratio}")
    if ceiling:
        lines += ["", f"Ceiling (real training images, same teacher and schedule): {ceiling:.2f}; "
                  f"{TARGET} x ceiling = {TARGET * ceiling:.2f}."]
    return "\n".join(lines)


def chart(rows: pd.DataFrame, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.8), dpi=100)
    axes = figure.add_subplot()
    points = rows[rows["method"] != CEILING].dropna(subset=["total_cpu_s"])
    recipe = points[points["method"].str.match(r"generator ensemble(, (half|twice) the epochs)?$")]
    recipe = recipe.sort_values("total_cpu_s")
    axes.errorbar(recipe["total_cpu_s"], recipe["student_top1_mean"], yerr=recipe["student_top1_std"], marker="o",
                  capsize=3, label="generator ensemble (images x epochs)")
    for _, r in recipe.iterrows():
        axes.annotate(f"{int(r['images']) // 1000}k x {int(r['distill_epochs'])}", (r["total_cpu_s"],
                      r["student_top1_mean"]), textcoords="offset points", xytext=(4, -12), fontsize="x-small")
    for _, r in points.drop(recipe.index).iterrows():
        axes.errorbar([r["total_cpu_s"]], [r["student_top1_mean"]], yerr=[r["student_top1_std"]], marker="s",
                      capsize=3, linestyle="none", label=f"{r['method']} ({int(r['images']) // 1000}k x "
                      f"{int(r['distill_epochs'])})")
    ceiling = rows.loc[rows["method"] == CEILING, "student_top1_mean"]
    if len(ceiling):
        axes.axhline(float(ceiling.iloc[0]), color="0.3", linestyle="--", linewidth=1, label="real-data ceiling")
        axes.axhline(TARGET * float(ceiling.iloc[0]), color="0.6", linestyle=":", linewidth=1,
                     label=f"{TARGET} x ceiling")
    axes.set_xlabel("total CPU-seconds (synthesis + distillation), one thread")
    axes.set_ylabel("student top-1 (%), final epoch")
    axes.set_title(title, fontsize="medium", loc="left")
    axes.grid(color="0.9")
    axes.legend(fontsize="x-small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outs", nargs="+", help="bench_methods.py output folders (each with results.csv)")
    parser.add_argument("--config", default="mnistm32", help="the configuration whose rows are drawn")
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="write the table (headed with date, machine, commit, command) into FILE and the chart "
                        "beside it as FILE's name with .png")
    args = parser.parse_args(argv)
    rows = read_rows(args.outs, args.config)
    text = table(rows)
    print(text)
    if args.results:
        png = Path(args.results).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        chart(rows, png, f"{args.config}: student top-1 against total CPU")
        write_results_file(args.results, text + f"\n\n![top-1 against total CPU-s]({png.name})\n",
                           title="Quality per CPU-second")
    return text


if __name__ == "__main__":
    main()
