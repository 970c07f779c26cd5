"""Forward hooks held together and removed together: the base of the teacher probes (BN statistics, CAMs)."""
from __future__ import annotations

import torch.nn as nn


class ForwardHooks:
    """`hooks(modules, fn)` registers `fn(module)`'s hook on each module; `remove()` (or leaving a `with`
    block) unregisters them all, so a probe never outlives its use on a shared teacher."""

    _handles: list

    def hooks(self, modules: list[nn.Module], make) -> None:
        self._handles = [m.register_forward_hook(make(i, m)) for i, m in enumerate(modules)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
