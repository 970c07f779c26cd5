"""The stopping rule of `distill train` on the held-out KL (`--stop-patience`, `--stop-min-delta`,
`--stop-cooldown`): `--epochs` becomes a cap, and a run whose val_kl (validation.py) has stopped falling
anneals its learning rate to 0 and ends early.

    rule = StopRule.of(config)              # None: --stop-patience 0, the fixed schedule of --epochs
    trigger = rule.decide(history)          # None until the held-out KL stops falling
    cool_down(scheduler, trigger.epoch * steps, trigger.cooldown * steps)   # engine.py; the run ends at trigger.end

After epoch e (finished epochs, 1-based) the rule triggers when the best val_kl of the last N epochs
(N = patience) is not below (1 - min_delta) x the best val_kl of the epochs before them: the split's KL has
not improved by more than min_delta, relative, for N epochs. It needs N + 1 measured epochs, never triggers
inside the warm-up, nor at the cap (nothing is left to cool down). The cool-down lasts
max(1, round(cooldown x e)) epochs, at most what is left of the cap.

The decision is a pure function of the val_kl column of the history (metrics.csv; the checkpoint holds it),
the first epoch at which the condition holds: a run killed and resumed (`--resume`, torchrun's restarts)
makes it at the same epoch as an uninterrupted run, whether it was killed before or after it. metrics.csv
records it (PHASE_COLUMN: "train", then "cool-down" for the epochs after the trigger), and `run_end` puts in
words why a run ended, for `distill train`'s result and `distill report`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

from dfkd.common.errors import UserError

from .validation import AUTO, NONE, has_val_split

PHASE_COLUMN = "phase"                 # metrics.csv, with the rule on
TRAIN, COOL_DOWN = "train", "cool-down"


def _measured(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class Trigger:
    """The rule's decision: after `epoch` finished epochs the held-out KL had not fallen, the learning rate
    anneals to 0 over `cooldown` epochs and the run ends at `end`, of at most `cap`. `kl`: the best val_kl of
    the last `patience` epochs; `best`, `best_epoch`: the best before them."""

    epoch: int
    cooldown: int
    cap: int
    patience: int
    min_delta: float
    kl: float
    best: float
    best_epoch: int

    @property
    def end(self) -> int:
        return self.epoch + self.cooldown

    def describe(self) -> str:
        """The log line of the trigger."""
        return (f"epoch {self.epoch}: held-out KL {self.kl:.4g} has not fallen {_percent(self.min_delta)} below "
                f"{self.best:.4g} (epoch {self.best_epoch}) in {_epochs(self.patience)}; the learning rate anneals to "
                f"0 over {_epochs(self.cooldown)}, the run ends at epoch {self.end} of at most {self.cap}")


@dataclass(frozen=True)
class StopRule:
    """The stopping rule of a run (module docstring): `patience` epochs, `min_delta` (relative),
    `cooldown` (a fraction of the epochs run when it triggers), at most `cap` epochs; it never triggers within
    the first `warmup_epochs`."""

    patience: int
    min_delta: float
    cooldown: float
    cap: int
    warmup_epochs: float = 0.0

    @classmethod
    def of(cls, config: Any) -> "StopRule | None":
        """The rule of a TrainConfig; None with stop_patience 0 (the fixed schedule)."""
        if config.stop_patience <= 0:
            return None
        return cls(config.stop_patience, config.stop_min_delta, config.stop_cooldown, config.epochs,
                   config.warmup_epochs)

    @classmethod
    def of_record(cls, settings: dict) -> "StopRule | None":
        """The rule of a run as its config.json records it (None: off, or recorded before the rule existed)."""
        try:
            if int(settings.get("stop_patience") or 0) <= 0:
                return None
            return cls(int(settings["stop_patience"]), float(settings["stop_min_delta"]),
                       float(settings["stop_cooldown"]), int(settings["epochs"]),
                       float(settings.get("warmup_epochs") or 0.0))
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        """The rule in words, for the start line."""
        return (f"stopping rule: when the held-out KL has not fallen {_percent(self.min_delta)} below its best in "
                f"{_epochs(self.patience)}, the learning rate anneals to 0 over {_percent(self.cooldown)} of the "
                f"epochs run and the run ends; at most {self.cap} epochs")

    def cooldown_epochs(self, epoch: int) -> int:
        """The cool-down's length after a trigger at `epoch`: a fraction of the epochs run, at least 1, at most
        what is left of the cap."""
        return min(max(1, round(self.cooldown * epoch)), self.cap - epoch)

    def check(self, kl: Sequence[Any], epoch: int) -> Trigger | None:
        """The trigger after `epoch` finished epochs, whose val_kl are `kl[:epoch]` (None: not measured), or
        None when the rule does not trigger there."""
        if epoch <= self.patience or epoch < self.warmup_epochs or epoch >= self.cap or epoch > len(kl):
            return None
        recent, before = kl[epoch - self.patience:epoch], kl[:epoch - self.patience]
        measured = [(value, e) for e, value in enumerate(before, 1) if _measured(value)]
        if not measured or not all(_measured(value) for value in recent):
            return None
        best, best_epoch = min(measured)
        if min(recent) < (1.0 - self.min_delta) * best:
            return None
        return Trigger(epoch, self.cooldown_epochs(epoch), self.cap, self.patience, self.min_delta, min(recent),
                       best, best_epoch)

    def decide(self, history: Iterable[dict]) -> Trigger | None:
        """The first epoch of `history` (a row per finished epoch, with val_kl) at which the rule triggers."""
        kl = [row.get("val_kl") for row in history]
        for epoch in range(self.patience + 1, len(kl) + 1):
            trigger = self.check(kl, epoch)
            if trigger is not None:
                return trigger
        return None


def phase(trigger: Trigger | None, epoch: int) -> str:
    """The PHASE_COLUMN of epoch `epoch` (1-based): cool-down after the trigger, train before and at it."""
    return COOL_DOWN if trigger is not None and epoch > trigger.epoch else TRAIN


def recorded_trigger(rows: Iterable[dict]) -> int | None:
    """The trigger epoch that metrics.csv's PHASE_COLUMN records: the epoch before its first cool-down row."""
    for row in rows:
        if row.get(PHASE_COLUMN) == COOL_DOWN:
            return int(row["epoch"]) - 1
    return None


def run_end(epochs_done: int, cap: int, rule: StopRule | None, trigger_epoch: int | None) -> str | None:
    """Why a run ended after `epochs_done` epochs (of at most `cap`; `trigger_epoch`: the rule's, or None), in
    words; what it is doing when it has not ended."""
    if rule is not None and trigger_epoch is not None:
        end = trigger_epoch + rule.cooldown_epochs(trigger_epoch)
        if epochs_done >= end:
            return f"stopped early by the held-out KL at epoch {end} of at most {cap} (trigger at epoch {trigger_epoch})"
        return f"in its cool-down since epoch {trigger_epoch} (trigger): ends at epoch {end} of at most {cap}"
    if epochs_done >= cap:
        return f"reached the cap of {cap} epochs" if rule is not None else f"ran the fixed {cap} epochs"
    return None


def settle_stop_rule(run: Any) -> None:
    """A step of TrainConfig.settle (`run`: the resolved config, common.recipes.Resolved): the rule needs a
    held-out split. Without one, an explicit --stop-patience is a UserError naming the fix; a recipe's falls
    back to the fixed schedule, and the start line says so. With one, the start line states the rule."""
    config = run.config
    if config.stop_patience <= 0:
        return
    if has_val_split(config.val_shards, config.shards):
        run.reason += f"; {StopRule.of(config).describe()}"
        return
    where = f"--val-shards {NONE}" if config.val_shards == NONE else f"--val-shards {AUTO}: no complete val/ beside --shards"
    if "stop_patience" in run.given:
        raise UserError(f"--stop-patience {config.stop_patience} stops on the held-out synthetic split's KL and there "
                        f"is none ({where}): `synth generate` writes a val/ split beside the shards by default (rerun "
                        "it on the same --out to add one) or pass --val-shards PATH; or use --stop-patience 0")
    run.config = replace(config, stop_patience=0)
    run.reason += (f"; {run.where} stop_patience {config.stop_patience} needs a held-out split and there is none "
                   f"({where}): the fixed schedule of {config.epochs} epochs")
