"""Stage two's recipe: which one applies to a run (`TrainConfig.recipe`) and the config it resolves to.

    auto (the default)  the recipe the shards were made with (the manifest's `recipe`), when it is a
                        shipped one, none, or a file still where it was; else (or when the manifest
                        records none) the one chosen from the teacher's input (`common.recipes.choose_recipe`)
    NAME | PATH         a shipped recipe or a TOML file: its [distill] table
    none                the declared defaults only

Precedence for every option: given by the caller (a flag, or a field passed to TrainConfig) > the
recipe's [distill] table > the declared default.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from dfkd.common.recipes import (AUTO, NONE, Recipe, Resolved, apply_recipe, choose_recipe, empty_recipe, load_recipe,
                                 pick_recipe, shipped_names)
from dfkd.common.shards import Manifest

from .config import TrainConfig

# with --teacher-logits stored the student trains on the view the logits were computed on: these values,
# unless the caller gave others (then TrainConfig.resolved() says why they cannot be)
_STORED_VIEW = {"aug": "none", "mixup": 0.0, "cutmix": 0.0}


def _shards_recipe(manifest: Manifest) -> tuple[Recipe, str] | None:
    """The recipe the shards were made with, when it can still be read here (None otherwise)."""
    made = manifest.recipe or {}
    name, path, sha = made.get("name"), made.get("path"), made.get("sha256")
    if not name:  # shards written before manifests recorded the recipe
        return None
    if name == NONE:
        return empty_recipe(), "recipe: none (auto: the shards were made with --recipe none: the declared defaults)"
    if name in shipped_names():
        recipe = load_recipe(name)
        newer = "" if sha in (None, recipe.sha256) else "; the shards were made with an earlier version of it"
        return recipe, f"recipe: {name} (auto: the recipe the shards were made with{newer})"
    if path and Path(path).is_file() and hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha:
        recipe = load_recipe(path)
        return recipe, f"recipe: {recipe.name} (auto: the recipe file the shards were made with, {path})"
    return None


def pick_for_shards(choice: str | None, manifest: Manifest) -> tuple[Recipe, str]:
    """The recipe for a run on `manifest`'s shards, and its start line."""
    if choice not in (None, "", AUTO):
        return pick_recipe(choice)
    found = _shards_recipe(manifest)
    if found is not None:
        return found
    recipe, reason = choose_recipe(manifest.input_spec)
    made = (manifest.recipe or {}).get("name")
    if made:
        reason += f"; the shards' recipe {made!r} is not here"
    return recipe, reason


def resolve_run(config: TrainConfig, manifest: Manifest) -> Resolved:
    """`config` with its recipe applied to every option its caller did not give."""
    run = apply_recipe(config, pick_for_shards(config.recipe, manifest), "distill")
    off = {}
    if run.config.teacher_logits == "stored":  # the student must see the stored view: no augmentation, no mixup
        off = {k: v for k, v in _STORED_VIEW.items() if k not in run.given and getattr(run.config, k) != v}
        if off:
            run.config = replace(run.config, **off)
            run.reason += f"; --teacher-logits stored: {', '.join(f'{k} {v}' for k, v in off.items())}"
    run.check(run.config.resolved, also_given=off)  # values that do not work together: named if the recipe set them
    return run
