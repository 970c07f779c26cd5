"""Write a benchmark's markdown table into a file under results/, headed with when, where and how it was made.

    from results_header import write_results_file
    write_results_file("results/mnist.md", table_markdown, title="MNIST main job")

The file's generated part (between START and END) holds the header (date UTC, machine, commit, the command
line) and the table. A rerun puts its own part there and keeps the one it replaces right below it, as a dated
"Earlier run", so a number quoted elsewhere stays in the file with its date, machine and command; the notes
written further down stay too. A file without the marks is written new: the title, then the generated part.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = "<!-- generated: the lines up to the end mark are rewritten by the command named below -->"
END = "<!-- end of the generated part; what is below it is kept -->"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_names() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # no torch, or a broken driver: the header says no GPU was used
        pass
    return "no GPU"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {gpu_names()}"


def commit(root: Path = ROOT) -> str:
    """`git rev-parse --short HEAD`, with "+ local changes" when the work tree differs; "unknown" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + local changes" if dirty else head or "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.is_absolute():
        try:
            script = script.relative_to(ROOT)
        except ValueError:
            pass
    return shlex.join(["python", str(script), *argv[1:]])


def header(command: str, now: datetime.datetime | None = None, root: Path = ROOT) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return "\n".join([f"- Date: {now:%Y-%m-%d %H:%M} UTC", f"- Machine: {machine()}", f"- Commit: {commit(root)}",
                      f"- Command: `{command}`"])


def generated_part(table: str, command: str, now: datetime.datetime | None = None, root: Path = ROOT) -> str:
    return f"{START}\n{header(command, now, root)}\n\n{table.strip()}\n{END}"


def write_results_file(path: str | os.PathLike, table: str, title: str, command: str | None = None,
                       now: datetime.datetime | None = None) -> Path:
    """Put `table` under a fresh header into `path`: replace the generated part, keep everything else."""
    path = Path(path)
    part = generated_part(table, command or command_line(), now)
    old = path.read_text() if path.exists() else ""
    if START in old and END in old and old.index(START) < old.index(END):
        earlier = old[old.index(START) + len(START):old.index(END)].strip()
        date = next((line[len("- Date: "):] for line in earlier.splitlines() if line.startswith("- Date: ")), "date unknown")
        text = (old[:old.index(START)] + part + f"\n\n### Earlier run: {date}\n\n{earlier}\n"
                + old[old.index(END) + len(END):])
    else:
        text = f"# {title}\n\n{part}\n" + (f"\n{old}" if old.strip() else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)
    print(f"wrote {path}")
    return path
