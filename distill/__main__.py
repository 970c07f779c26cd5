"""`python -m dfkd.distill ...` runs the `distill` command line."""
from .cli import main

main(prog_name="distill")
