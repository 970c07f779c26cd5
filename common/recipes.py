"""Recipes: TOML files that set options of both stages (the measured settings, in one place).

    description = "..."
    measured_on = ["MNIST lenet5"]          # what it was measured on; [] = a starting point only
    [synth]                                 # GenerateConfig options (`synth generate` flags, dashes or not)
    num_images = 96000
    [synth.method.generator]                # options of one synthesis method (as `--set key=value`)
    steps = 200
    [distill]                               # TrainConfig options (`distill train` flags)
    lr = 0.05

Shipped recipes live in `common/recipes/*.toml` (`--recipe NAME`); `--recipe PATH` reads any file.
Precedence for every option: an explicit flag (or `--set`, or a field given to the config in Python) >
the recipe > the option's declared default. Without `--recipe` the recipe is chosen from the teacher's
input (`choose_recipe`): small-grey (1 channel, <= 32 px), cifar10 / cifar100 (3 channels, 32 px, 10 / 100
classes, normalised as the shared CIFAR teacher bundle's), small-rgb (other 3-channel inputs <= 64 px), imagenet
(> 64 px); `--recipe none` uses the declared defaults only.
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import options
from .errors import UserError
from .input_spec import CIFAR_BUNDLE_STATS, InputSpec
from .options import explicit_fields, resolve  # noqa: F401  (re-exported: recipes.resolve is the documented entry)

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
AUTO, NONE = "auto", "none"
_TOP_KEYS = ("description", "measured_on", "synth", "distill")


@dataclass
class Recipe:
    name: str
    path: str | None               # None for the empty recipe ("none")
    sha256: str | None
    description: str = ""
    measured_on: list[str] = field(default_factory=list)
    synth: dict = field(default_factory=dict)     # GenerateConfig options (without "method")
    method: dict = field(default_factory=dict)    # method name -> its options
    distill: dict = field(default_factory=dict)   # TrainConfig options

    def record(self, reason: str) -> dict:
        """What a manifest (or run record) keeps about the recipe."""
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "reason": reason,
                "measured_on": list(self.measured_on)}

    @property
    def where(self) -> str:
        return f"recipe {Path(self.path).name}" if self.path else f"recipe {self.name}"


def shipped_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def empty_recipe() -> Recipe:
    return Recipe(NONE, None, None, "no recipe: the declared defaults")


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (`small-grey`), or a TOML file by path; `none`: the empty recipe."""
    text = str(name_or_path).strip()
    if text == NONE:
        return empty_recipe()
    path = Path(text).expanduser()
    if not (text.endswith(".toml") or "/" in text or path.is_file()):
        path = RECIPE_DIR / f"{text}.toml"
        if not path.is_file():
            raise UserError(f"unknown recipe {text!r}; shipped recipes: {', '.join(shipped_names())} "
                            "(or give the path of a .toml file, or `none` for the declared defaults)")
    if not path.is_file():
        raise UserError(f"recipe file {path} does not exist; give an existing .toml file or one of the shipped "
                        f"recipes: {', '.join(shipped_names())}")
    data = path.read_bytes()
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text; recipes are TOML files") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}; fix that line") from None
    unknown = sorted(set(table) - set(_TOP_KEYS))
    if unknown:
        raise UserError(f"recipe {path}: unknown key(s) {', '.join(unknown)}; a recipe has "
                        f"{', '.join(_TOP_KEYS)}")
    synth = dict(table.get("synth", {}))
    method = synth.pop("method", {})
    measured = table.get("measured_on", [])
    if not isinstance(synth, dict) or not isinstance(method, dict) or not isinstance(table.get("distill", {}), dict):
        raise UserError(f"recipe {path}: [synth], [synth.method.<name>] and [distill] must be tables")
    if any(not isinstance(v, dict) for v in method.values()):
        raise UserError(f"recipe {path}: synth.method holds one table per method ([synth.method.generator], ...); "
                        "the method itself is chosen with --method")
    if not isinstance(measured, list) or not all(isinstance(m, str) for m in measured):
        raise UserError(f"recipe {path}: measured_on must be a list of strings")
    name = path.stem if path.parent != RECIPE_DIR else text
    return Recipe(name=name, path=str(path.resolve()), sha256=hashlib.sha256(data).hexdigest(),
                  description=str(table.get("description", "")), measured_on=list(measured), synth=synth,
                  method={str(k): dict(v) for k, v in method.items()}, distill=dict(table.get("distill", {})))


def _measured(recipe: Recipe) -> str:
    return f"measured on {', '.join(recipe.measured_on)}" if recipe.measured_on else "not measured yet"


def choose_recipe(spec: "InputSpec") -> tuple[Recipe, str]:
    """The best measured recipe for a teacher taking `spec`'s input, and the one line that says why."""
    what = f"{spec.channels}-channel {spec.size} px teacher"
    if spec.channels == 3 and spec.size == 32 and _bundle_normalised(spec):
        # the papers' CIFAR teachers: their protocol's budget, not small-rgb's (measured on MNIST-M with ResNet-20)
        name = f"cifar{spec.num_classes}"
        return load_recipe(name), (f"recipe: {name} (auto: {what}, {spec.num_classes} classes, normalised as the "
                                   f"CIFAR-{spec.num_classes} teacher bundle; not measured on CIFAR)")
    if spec.size > 64:
        name, exact = "imagenet", True
    elif spec.channels == 1:
        name, exact = "small-grey", spec.size <= 32
    else:
        name, exact = "small-rgb", spec.channels == 3
    recipe = load_recipe(name)
    if exact and recipe.measured_on:
        return recipe, f"recipe: {name} (auto: {what}; {_measured(recipe)})"
    return recipe, (f"recipe: {name} (auto: {what}; nothing measured for a teacher like this: using the closest, "
                    f"{name}, {_measured(recipe)})")


def _bundle_normalised(spec: "InputSpec") -> bool:
    """Whether `spec` has the class count and the mean/std of the shared CIFAR-10 / CIFAR-100 teacher bundle."""
    stats = CIFAR_BUNDLE_STATS.get(spec.num_classes)
    return stats is not None and all(abs(a - b) < 1e-4 for a, b in zip((*spec.mean, *spec.std), (*stats[0], *stats[1])))


def pick_recipe(choice: str | None, spec: "InputSpec | None" = None) -> tuple[Recipe, str]:
    """`choice` (auto, none, a name or a path) as a recipe and its start line; auto needs `spec`."""
    choice = AUTO if choice in (None, "") else choice
    if choice == AUTO:
        if spec is None:
            raise ValueError("the automatic recipe needs the teacher's input spec")
        return choose_recipe(spec)
    recipe = load_recipe(choice)
    if recipe.name == NONE:
        return recipe, "recipe: none (--recipe none: the declared defaults)"
    return recipe, f"recipe: {recipe.name} (--recipe {choice}; {_measured(recipe)})"


@dataclass
class Resolved:
    """A stage's config with its recipe applied (`apply_recipe`), and what to record about the recipe."""

    config: Any
    recipe: Recipe
    reason: str                    # the start line: `recipe: NAME (why)`
    section: str = "synth"         # the recipe's table the config was resolved from: synth or distill
    given: frozenset = frozenset()  # the options the caller gave (not the recipe's)

    @property
    def where(self) -> str:
        return f"{self.recipe.where} [{self.section}]"

    def record(self) -> dict:
        """What a manifest (or run record) keeps about the recipe."""
        return self.recipe.record(self.reason)

    def check(self, check: Any, also_given: Any = ()) -> Any:
        """`check()` (a cross-option check of the resolved config); its UserError names the options whose
        value came from the recipe. `also_given`: options set by the stage itself, not by the recipe."""
        try:
            return check()
        except UserError as e:
            raise options.name_recipe_values(e, type(self.config), getattr(self.recipe, self.section),
                                             self.given | set(also_given), self.where) from None


def apply_recipe(config: Any, picked: tuple[Recipe, str], section: str) -> Resolved:
    """`config` (a dataclass of declared options whose class tracks the fields its caller gave) resolved
    with the recipe `picked` (a recipe and its start line, as `pick_recipe` returns): each option given by
    the caller > the recipe's `section` table (synth or distill) > the declared default. Every value of
    that table is checked, also those the caller overrides, and the result validated."""
    recipe, reason = picked
    given = explicit_fields(config)
    explicit = {name: getattr(config, name) for name in given} | {"recipe": config.recipe}
    resolved = Resolved(config, recipe, reason, section, frozenset(given))
    resolved.config = resolve(type(config), None, getattr(recipe, section), explicit, where=resolved.where)
    return resolved


def recipe_keys(section: str, method: str | None = None) -> set[str]:
    """Option names that some shipped recipe sets in `section` ("synth", "distill"; or "method" with the
    method's name)."""
    keys: set[str] = set()
    for name in shipped_names():
        recipe = load_recipe(name)
        table = recipe.method.get(method, {}) if section == "method" else getattr(recipe, section)
        keys |= {k.replace("-", "_") for k in table}
    return keys


def as_dict(value: Any) -> Any:
    """JSON-friendly copy (tuples as lists)."""
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    return value
