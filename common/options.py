"""One declaration per option: dataclass fields carrying their help, allowed values and effect.

    @dataclass
    class GenerateConfig:
        HELP_GROUPS = ("Output", "Execution")   # the subjects of `--help`, in its order
        num_images: int = option(50_000, help="Images to synthesise.", min=1, group="Output")
        write_workers: int | None = option(None, help="...", min=0, effect="none", group="Execution")

Everything else is derived from these declarations: the command-line options (`click_options`), the
help text with its default, grouped by subject (`group`: common/clihelp.py), `synth methods`
(`describe`), parsing of `--set key=value`, recipe and CLI values (`parse_value`, `parse_options`),
validation (`validate`), the config hash (`hashed`) and what may change when a run is resumed
(`resumable`), and which options a recipe may not set (`recipe=False`: an invocation's own, such as its
output folder or `--overwrite`).

`effect` says what an option changes:
  "output"  what is produced (the shard bytes in stage one, the trained student in stage two): hashed,
            must match when a run is rerun or resumed;
  "order"   the order of samples or the draws of augmentation: hashed and refused on resume too (with
            its own message: the result is equally good, just not the same run);
  "none"    execution only (speed, progress, paths checked by checksum, evaluation): not hashed, may
            change on resume.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from dataclasses import MISSING
from typing import Any, Callable, Iterable, Mapping

from .errors import UserError

EFFECTS = ("output", "order", "none")
_META_KEY = "dfkd_option"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any                    # the declared (resolved) annotation, e.g. int, float | None, tuple[float, ...]
    default: Any                 # the declared default (MISSING when required; default_factory() when given)
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], str | None] | None = None
    effect: str = "output"
    cli: bool = True
    flag: str | None = None      # the command-line flag; None: --name-with-dashes
    group: str | None = None     # the subject `--help` lists it under (common/clihelp.py); needed on the CLI
    recipe: bool = True          # False: it belongs to one invocation (a folder, overwrite), never to a recipe

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def base_type(self) -> Any:
        """The type without Optional: int for `int | None`."""
        return _strip_optional(self.type)[0]

    @property
    def optional(self) -> bool:
        return _strip_optional(self.type)[1]


def option(default: Any = MISSING, *, help: str, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, check: Callable[[Any], str | None] | None = None, effect: str = "output",
           cli: bool = True, flag: str | None = None, group: str | None = None, recipe: bool = True,
           default_factory: Callable[[], Any] | None = None) -> dataclasses.Field:
    """A dataclass field with the option's metadata (see the module docstring)."""
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {EFFECTS}, not {effect!r}")
    meta = {_META_KEY: {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min,
                        "max": max, "check": check, "effect": effect, "cli": cli, "flag": flag,
                        "group": group, "recipe": recipe}}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(value: float) -> str | None:
    """A `check` for option(): the value must be above 0."""
    return None if value > 0 else f"must be positive (got {value:g})"


def below_one(value: float) -> str | None:
    """A `check` for option(): the value must be below 1."""
    return None if value < 1 else f"must be below 1 (got {value:g})"


def one_of(registry: Mapping[str, Any]) -> Callable[[Any], str | None]:
    """A `check` for option(): the value must be a key of `registry` as it is when checked (a plug-in
    registered after the option was declared counts), with the message of `choices`."""
    def check(value: Any) -> str | None:
        return None if value in registry else f"must be one of {', '.join(registry)} (got {_show(value)})"
    return check


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


@functools.lru_cache(maxsize=None)
def _options_of(cls: type) -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata.get(_META_KEY)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with common.options.option(...)")
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        specs.append(OptionSpec(f.name, hints[f.name], default, **meta))
    return tuple(specs)


def options_of(cls: type) -> list[OptionSpec]:
    """The declared options of a config dataclass (or of an instance's class), in declaration order."""
    return list(_options_of(cls if isinstance(cls, type) else type(cls)))


def _spec_map(cls: type) -> dict[str, OptionSpec]:
    return {s.name: s for s in options_of(cls)}


def _kind(tp: Any) -> str:
    base, optional = _strip_optional(tp)
    origin = typing.get_origin(base) or base
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "comma-separated values", dict: "a table"}.get(origin, getattr(origin, "__name__", str(origin)))
    return name + (" (or none)" if optional else "")


def parse_value(spec: OptionSpec, raw: Any, where: str = "") -> Any:
    """`raw` (a string from the command line or `--set`, or a TOML / Python value) as the option's type.
    UserError naming the option (and `where` it came from) when it does not fit."""
    base, optional = _strip_optional(spec.type)
    origin = typing.get_origin(base) or base
    label = f"{where} {spec.name}".strip() if where else spec.name

    def bad() -> UserError:
        return UserError(f"{label} expects {_kind(spec.type)}, got {raw!r}")

    if raw is None:
        if optional:
            return None
        raise bad()
    if isinstance(raw, str) and optional and raw.strip().lower() in ("none", "null"):
        return None
    if origin is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        raise bad()
    if origin is int:
        if isinstance(raw, bool):
            raise bad()
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.strip().replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if origin is float:
        if isinstance(raw, bool):
            raise bad()
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if origin is str:
        if isinstance(raw, (str, os.PathLike)):
            return os.fspath(raw)
        raise bad()
    if origin is tuple:
        args = typing.get_args(base)
        element = args[0] if args else None
        if element is None and isinstance(spec.default, tuple) and spec.default:
            element = type(spec.default[0])
        items = [v.strip() for v in raw.split(",") if v.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise bad()
        if element in (None, str):
            return tuple(str(v) for v in items)
        sub = OptionSpec(spec.name, element, MISSING, spec.help)
        try:
            return tuple(parse_value(sub, v) for v in items)
        except UserError:
            raise bad() from None
    if origin is dict:
        if isinstance(raw, Mapping):
            return dict(raw)
        raise bad()
    return raw


def parse_options(cls: type, mapping: Mapping[str, Any], where: str) -> dict:
    """{name: value} from raw values (keys may use dashes), each checked against the declaration of `cls`.
    UserError for an unknown key, listing the valid ones."""
    specs = _spec_map(cls)
    values = {}
    for key, raw in mapping.items():
        name = str(key).strip().replace("-", "_")
        if name not in specs:
            raise UserError(f"{where}: unknown option {key!r}; valid options: {', '.join(sorted(specs))}")
        values[name] = parse_value(specs[name], raw, where)
    return values


def _label(cls: type, spec: OptionSpec) -> str:
    prefix = getattr(cls, "OPTION_LABEL", None)
    return f"{prefix} {spec.name}" if prefix else spec.flag_name


def _show(value: Any) -> str:
    if value is MISSING:
        return "(required)"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def problem(spec: OptionSpec, value: Any) -> str | None:
    """What is wrong with a parsed `value` for its declaration (choices, min, max, check), e.g. "must be at
    least 8 (got 4)"; None when it fits."""
    if value is None and spec.optional:
        return None
    if spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(map(str, spec.choices))} (got {_show(value)})"
    if spec.min is not None and value < spec.min:
        return f"must be at least {_show(spec.min)} (got {_show(value)})"
    if spec.max is not None and value > spec.max:
        return f"must be at most {_show(spec.max)} (got {_show(value)})"
    return spec.check(value) if spec.check is not None else None


def validate(config: Any) -> None:
    """Check every option of `config` against its declaration (choices, min, max, check). UserError
    `--flag-name ...` (or `<method> option name ...` for a class with OPTION_LABEL) saying what is allowed."""
    cls = type(config)
    for spec in options_of(cls):
        wrong = problem(spec, getattr(config, spec.name))
        if wrong:
            raise UserError(f"{_label(cls, spec)} {wrong}")


def check_options(cls: type, mapping: Mapping[str, Any], where: str) -> dict:
    """`parse_options`, and each value checked against its declaration too (choices, min, max, check):
    for a recipe's table, whose every value must be valid whether or not something overrides it. Errors
    name `where` and the key: `recipe r.toml [synth] resolution must be at least 8 (got 4)`."""
    values = parse_options(cls, mapping, where)
    specs = _spec_map(cls)
    for name in values:
        spec = specs[name]
        if not spec.recipe or not spec.cli:
            fix = f"pass {spec.flag_name} on the command line" if spec.cli else "remove it"
            raise UserError(f"{where} {name}: a recipe cannot set it (it belongs to one invocation): {fix}")
    for name, value in values.items():
        wrong = problem(specs[name], value)
        if wrong:
            raise UserError(f"{where} {name} {wrong}")
    return values


def name_recipe_values(error: UserError, cls: type, recipe_section: Mapping[str, Any] | None,
                       given: Iterable[str], where: str) -> UserError:
    """`error` (about a combination of options, naming their flags) with the options among them whose
    value came from the recipe named: `...; --warmup-epochs is recipe r.toml [distill] warmup_epochs`.
    `given`: the options the caller gave (those are not the recipe's)."""
    given = set(given)
    keys = {str(k).strip().replace("-", "_") for k in (recipe_section or {})} - given
    named = [s for s in options_of(cls) if s.name in keys
             and re.search(re.escape(_label(cls, s)) + r"(?![\w-])", error.message)]
    if not named:
        return error
    origins = "; ".join(f"{_label(cls, s)} is {where} {s.name}" for s in named)
    return UserError(f"{error.message} ({origins})")


def hashed(config: Any) -> dict:
    """The options that change what is produced or its order (effect != "none"): part of a config hash."""
    return {s.name: getattr(config, s.name) for s in options_of(type(config)) if s.effect != "none"}


def resumable(cls: type) -> set[str]:
    """The options that may change when a run is resumed (effect == "none")."""
    return {s.name for s in options_of(cls) if s.effect == "none"}


@dataclasses.dataclass(frozen=True)
class Change:
    """One setting that differs between a recorded run and this one."""

    name: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.name} {self.old!r} -> {self.new!r}"


def _as_stored(value: Any) -> Any:
    """`value` as JSON would store it (tuples as lists), for comparison with a recorded one."""
    if isinstance(value, (list, tuple)):
        return [_as_stored(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _as_stored(v) for k, v in value.items()}
    return value


def declared_defaults(cls: type) -> dict[str, Any]:
    """Each option of `cls` with its declared default: the value of a setting a record written before it lacks."""
    return {s.name: s.default for s in options_of(cls)}


def differences(old: Mapping[str, Any], new: Mapping[str, Any], cls: type | None = None,
                defaults: Mapping[str, Any] | None = None) -> list[Change]:
    """The settings whose value differs between a recorded run (`old`) and this one (`new`), values
    compared as JSON would store them: the one "what changed" behind every refusal of a rerun or resume
    with other settings. With `cls`: its hashed options (effect != "none"), in declaration order, a name
    missing from `old` taking its value from `defaults` (settings added since `old` was written); without:
    every key of either mapping, sorted."""
    defaults = defaults or {}
    if cls is None:
        names = sorted(set(old) | set(new))
    else:
        names = [s.name for s in options_of(cls) if s.effect != "none" and (s.name in old or s.name in new)]
    out = []
    for name in names:
        before, after = old.get(name, defaults.get(name)), new.get(name)
        if _as_stored(before) != _as_stored(after):
            out.append(Change(name, before, after))
    return out


def resolve(cls: type, declared_defaults: Mapping[str, Any] | None, recipe_section: Mapping[str, Any] | None,
            explicit: Mapping[str, Any] | None, where: str = "recipe") -> Any:
    """An instance of `cls`: each option from `explicit` if given there, else from `recipe_section`, else
    from `declared_defaults` (None: the declarations' own defaults). Every value is parsed, every recipe
    value checked against its declaration (even one the caller overrides) and the result validated;
    `where` names the recipe section in errors."""
    specs = options_of(cls)
    values = {s.name: s.default for s in specs if s.default is not MISSING}
    if declared_defaults:
        values.update(parse_options(cls, declared_defaults, "defaults"))
    if recipe_section:  # every value checked, also those the caller overrides: a recipe is a shared file
        values.update(check_options(cls, recipe_section, where))
    if explicit:
        values.update(parse_options(cls, explicit, "option"))
    missing = [s.flag_name for s in specs if s.name not in values]
    if missing:
        raise UserError(f"missing required option(s): {', '.join(missing)}")
    try:
        return make_config(cls, values)
    except UserError as e:
        raise name_recipe_values(e, cls, recipe_section, explicit or {}, where) from None


def make_config(cls: type, values: Mapping[str, Any]) -> Any:
    """`cls(**values)` (parsed values), validated: its own `validate()` where it has one (checks of
    combinations too), else `validate`."""
    config = cls(**values)
    checker = getattr(config, "validate", None)
    checker() if callable(checker) else validate(config)
    return config


# --------------------------------------------------------------------------- command line
def _click_type(spec: OptionSpec):
    import click

    base = spec.base_type
    origin = typing.get_origin(base) or base
    if spec.choices is not None and origin is str:
        return click.Choice([str(c) for c in spec.choices])
    if origin in (int, float, str) and not spec.optional:
        return {int: click.INT, float: click.FLOAT, str: click.STRING}[origin]

    class Parsed(click.ParamType):
        name = {int: "integer", float: "float", str: "text", tuple: "list"}.get(origin, "value")

        def convert(self, value, param, ctx):
            if not isinstance(value, str):
                return value
            try:
                return parse_value(spec, value)
            except UserError as e:
                self.fail(e.message, param, ctx)
    return Parsed()


def click_options(cls: type, exclude: Iterable[str] = (), rename: Mapping[str, str] | None = None,
                  recipe_keys: Iterable[str] = ()) -> Callable:
    """A decorator adding one click option per command-line option of `cls` (declaration order), each
    with `default=None` (unset: the recipe or the declared default decides; `explicit_values` drops
    them) and in its help group (common/clihelp.py; TypeError for an option declared without one).
    `rename` maps an option name to another flag; `recipe_keys`: options some recipe sets (their help
    says so)."""
    from .clihelp import grouped_option

    exclude, rename, recipe_keys = set(exclude), dict(rename or {}), set(recipe_keys)
    specs = [s for s in options_of(cls) if s.cli and s.name not in exclude]
    for spec in specs:
        if not spec.group:
            raise TypeError(f"{cls.__name__}.{spec.name} has no help group: declare it with option(..., group=...)")

    def decorate(fn: Callable) -> Callable:
        for spec in reversed(specs):
            flag = rename.get(spec.name, spec.flag_name)
            default = "" if spec.required else f"default: {_show(spec.default)}"
            if spec.name in recipe_keys:
                default += ", or the recipe's value" if default else "from the recipe"
            text = spec.help + (f" [{default}]" if default else "")
            if spec.base_type is bool:
                decls = [f"{flag}/--no-{flag[2:]}", spec.name]
                fn = grouped_option(*decls, group=spec.group, default=None, help=text)(fn)
            else:
                fn = grouped_option(flag, spec.name, group=spec.group, type=_click_type(spec), default=None,
                                    required=spec.required and spec.name not in recipe_keys, help=text)(fn)
        return fn
    return decorate


def explicit_values(kwargs: Mapping[str, Any]) -> dict:
    """The options given on the command line: `kwargs` without the None sentinels of unset flags."""
    return {k: v for k, v in kwargs.items() if v is not None}


def describe(cls: type) -> list[str]:
    """One line per option: `name = default  help (choices)`, for `synth methods` and the like."""
    lines = []
    for spec in options_of(cls):
        extra = f" (one of {', '.join(map(str, spec.choices))})" if spec.choices else ""
        lines.append(f"{spec.name} = {_show(spec.default)}  {spec.help}{extra}")
    return lines


# --------------------------------------------------------------------------- explicitly given fields
def track_explicit(cls: type) -> type:
    """Class decorator for a config dataclass: each instance remembers which fields its caller gave
    (`explicit_fields`), so that a recipe fills only the others. `dataclasses.replace` gives every field."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        object.__setattr__(self, "_explicit", frozenset(names[:len(args)]) | frozenset(kwargs))
    cls.__init__ = __init__
    return cls


def explicit_fields(config: Any) -> frozenset:
    """The fields the caller of `config`'s constructor gave (all of them for an untracked class)."""
    return getattr(config, "_explicit", frozenset(s.name for s in options_of(type(config))))
