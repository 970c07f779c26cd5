"""The names of stage two's training losses (`distill train --loss`), each implemented in
distill/losses.py's LOSSES. A leaf module: the config lists the names without importing the losses,
which import the config."""

LOSS_NAMES = ("kd",)
