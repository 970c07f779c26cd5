"""Recipes: TOML files that set options of both stages (the measured settings, in one place).

    description = "..."
    measured_on = ["MNIST lenet5"]          # what it was measured on; [] = a starting point only
    [synth]                                 # GenerateConfig options (`synth generate` flags, dashes or not)
    num_images = 96000
    [synth.method.generator]                # options of one synthesis method (as `--set key=value`)
    steps = 200
    [distill]                               # TrainConfig options (`distill train` flags)
    lr = 0.05
    [distill.loss.kd]                       # options of one training loss (its `distill train` flags)
    temperature = 4.0

Shipped recipes live in `common/recipes/*.toml` (`--recipe NAME`); `--recipe PATH` reads any file.
Precedence for every option: an explicit flag (or `--set`, or a field given to the config in Python) >
the recipe > the option's declared default. Without `--recipe` the recipe is chosen from the teacher's
input (`choose_recipe`): small-grey (1 channel, <= 32 px), cifar10 / cifar100 (3 channels, 32 px, 10 / 100
classes, normalised as the shared CIFAR teacher bundle's), small-rgb (other 3-channel inputs <= 64 px), imagenet
(> 64 px); `--recipe none` uses the declared defaults only. `distill train`'s automatic choice is the
recipe the shards were made with (`pick_for_shards`), else the same choice by input.

Both stages resolve their config in one place, `resolve_recipe`, before any work: the recipe is picked,
applied to the stage's options, and the chosen plug-in's options (a synthesis method's, a training
loss's: `PLUGINS`) are parsed once into its declared dataclass (`Resolved.plugin`).
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from . import options
from .errors import UserError
from .input_spec import CIFAR_BUNDLE_STATS, InputSpec
from .options import check_options, explicit_fields, make_config, parse_options, resolve
from .shards import Manifest

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
AUTO, NONE = "auto", "none"
_TOP_KEYS = ("description", "measured_on", "synth", "distill")
# each stage's table, the plug-in kind whose tables it holds ([synth.method.<name>], [distill.loss.<name>];
# the config's fields `<kind>` and `<kind>_options` name it and carry its given options) and where those
# given options come from, in errors
PLUGINS = {"synth": ("method", "--set"), "distill": ("loss", "option")}


@dataclass
class Recipe:
    name: str
    path: str | None               # None for the empty recipe ("none")
    sha256: str | None
    description: str = ""
    measured_on: list[str] = field(default_factory=list)
    synth: dict = field(default_factory=dict)     # GenerateConfig options (without "method")
    method: dict = field(default_factory=dict)    # method name -> its options
    distill: dict = field(default_factory=dict)   # TrainConfig options (without "loss")
    loss: dict = field(default_factory=dict)      # loss name -> its options

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
    measured = table.get("measured_on", [])
    stages, plugins = {}, {}
    for section, (kind, _) in PLUGINS.items():
        stage = table.get(section, {})
        if not isinstance(stage, dict):
            raise UserError(f"recipe {path}: [{section}] must be a table")
        stages[section] = dict(stage)
        plugins[kind] = stages[section].pop(kind, {})
        if not isinstance(plugins[kind], dict) or any(not isinstance(v, dict) for v in plugins[kind].values()):
            raise UserError(f"recipe {path}: {section}.{kind} holds one table per {kind} ([{section}.{kind}.<name>]); "
                            f"the {kind} itself is chosen with --{kind}")
    if not isinstance(measured, list) or not all(isinstance(m, str) for m in measured):
        raise UserError(f"recipe {path}: measured_on must be a list of strings")
    name = path.stem if path.parent != RECIPE_DIR else text
    return Recipe(name=name, path=str(path.resolve()), sha256=hashlib.sha256(data).hexdigest(),
                  description=str(table.get("description", "")), measured_on=list(measured), synth=stages["synth"],
                  method={str(k): dict(v) for k, v in plugins["method"].items()}, distill=stages["distill"],
                  loss={str(k): dict(v) for k, v in plugins["loss"].items()})


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
    """The recipe for a run on `manifest`'s shards (auto: the one they were made with, else the one chosen
    from their teacher's input), and its start line."""
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


@dataclass
class Resolved:
    """A stage's config with its recipe applied (`resolve_recipe`), the chosen plug-in's options parsed into
    its declared dataclass (`plugin`), and what to record about the recipe."""

    config: Any
    recipe: Recipe
    reason: str                    # the start line: `recipe: NAME (why)`
    section: str = "synth"         # the recipe's table the config was resolved from: synth or distill
    given: frozenset = frozenset()  # the options the caller gave (not the recipe's)
    plugin: Any = None             # the chosen method's or loss's config, parsed once

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


def resolve_recipe(config: Any, spec: InputSpec | None = None, manifest: Manifest | None = None) -> Resolved:
    """`config` (a dataclass of declared options whose class tracks the fields its caller gave, with
    RECIPE_TABLE, the recipe's table of its options, and PLUGINS, its plug-ins by name) resolved before any
    work, the one path of both stages:

      - the recipe: `config.recipe`; auto chooses by the shards' `manifest` (stage two) or by the
        teacher's input `spec` (stage one);
      - each option: given by the caller > the recipe's table > the declared default; every value of the
        table checked, also those the caller overrides, and the result validated;
      - the plug-in (`config.<kind>`, kind from PLUGINS: method, loss): its options given by the caller
        (`config.<kind>_options`) > the recipe's [<table>.<kind>.<name>] > its declared defaults, parsed
        once into its Config (`Resolved.plugin`); every plug-in table of the recipe is checked, and
        `<kind>_options` records the recipe's and the given values as given;
      - last, the config's own `settle(resolved)` where it has one (defaults that depend on other options,
        checks of combinations)."""
    section, plugins = config.RECIPE_TABLE, config.PLUGINS
    kind, given_where = PLUGINS[section]
    recipe, reason = pick_for_shards(config.recipe, manifest) if manifest is not None else pick_recipe(config.recipe,
                                                                                                        spec)
    given = explicit_fields(config)
    run = Resolved(config, recipe, reason, section, frozenset(given))
    _refuse_moved_keys(getattr(recipe, section), plugins, section, kind, run.where)
    explicit = {name: getattr(config, name) for name in given} | {"recipe": config.recipe}
    run.config = resolve(type(config), None, getattr(recipe, section), explicit, where=run.where)
    tables = getattr(recipe, kind)
    unknown = sorted(set(tables) - set(plugins))
    if unknown:
        raise UserError(f"{recipe.where}: [{section}.{kind}.{unknown[0]}] is not a {kind}; {kind}s: "
                        f"{', '.join(plugins)}")
    checked = {name: check_options(plugins[name].Config, table, f"{recipe.where} [{section}.{kind}.{name}]")
               for name, table in tables.items()}  # every table checked, not only the chosen one's
    chosen = plugins[getattr(run.config, kind)]
    own = getattr(config, f"{kind}_options") if f"{kind}_options" in given else {}
    run.plugin = make_config(chosen.Config, checked.get(chosen.name, {}) | parse_options(chosen.Config, own, given_where))
    run.config = replace(run.config, **{f"{kind}_options": {**tables.get(chosen.name, {}), **own}})
    settle = getattr(run.config, "settle", None)
    if callable(settle):
        settle(run)
    return run


def _refuse_moved_keys(table: Mapping[str, Any], plugins: Mapping[str, Any], section: str, kind: str,
                       where: str) -> None:
    """UserError for a key of the stage's table that is an option of a plug-in (it has a table of its own)."""
    for key in table:
        name = str(key).strip().replace("-", "_")
        owners = [p for p, cls in plugins.items() if name in {s.name for s in options.options_of(cls.Config)}]
        if owners:
            raise UserError(f"{where} {key} is an option of the {kind} {owners[0]}: move it to "
                            f"[{section}.{kind}.{owners[0]}]")


def recipe_keys(section: str, plugin: str | None = None) -> set[str]:
    """Option names that some shipped recipe sets in `section` ("synth", "distill"; or a plug-in kind,
    "method" or "loss", with the plug-in's name)."""
    keys: set[str] = set()
    for name in shipped_names():
        recipe = load_recipe(name)
        table = getattr(recipe, section).get(plugin, {}) if plugin is not None else getattr(recipe, section)
        keys |= {k.replace("-", "_") for k in table}
    return keys


def as_dict(value: Any) -> Any:
    """JSON-friendly copy (tuples as lists)."""
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    return value
