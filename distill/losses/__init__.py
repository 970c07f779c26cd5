"""Stage two's training losses, one file each (distill/losses/base.py says what a loss provides).
`LOSSES` maps the `distill train --loss` name to the class; adding a loss is one file and one entry."""
from __future__ import annotations

from .base import Loss
from .kd import KD

LOSSES: dict[str, type[Loss]] = {
    KD.name: KD,
}
