"""Synthesis methods, one file each. `METHODS` maps the CLI name to the class."""
from __future__ import annotations

from dfkd.common.accel import Compute
from dfkd.common.input_spec import InputSpec

from .base import SynthesisMethod, parse_config
from .deepinversion import DeepInversion
from .generator import GeneratorEnsemble
from .muse import Muse
from .noise import GaussianNoise

METHODS: dict[str, type[SynthesisMethod]] = {
    GeneratorEnsemble.name: GeneratorEnsemble,
    Muse.name: Muse,
    DeepInversion.name: DeepInversion,
    GaussianNoise.name: GaussianNoise,
}


def build_method(name: str, config: object, spec: InputSpec, num_images: int,
                 compute: Compute | None = None) -> SynthesisMethod:
    """The method `name` with its config (an instance of its Config, parsed once: common.recipes.resolve_recipe
    or `parse_config`) sized for `num_images` images, computing as `compute` says (default: the CPU, no speed
    switches)."""
    cls = METHODS[name]
    if type(config) is not cls.Config:
        raise TypeError(f"build_method({name!r}) takes a {cls.Config.__name__}, not {type(config).__name__}: "
                        "parse options with parse_config (or use method_from_options)")
    if hasattr(config, "for_input"):  # defaults that depend on the teacher's input ("auto")
        config = config.for_input(spec)
    if hasattr(config, "for_images"):
        config = config.for_images(num_images)
    method = cls(config, spec)
    if compute is not None:
        method.compute = compute
    return method


def method_from_options(name: str, options: dict, spec: InputSpec, num_images: int,
                        compute: Compute | None = None) -> SynthesisMethod:
    """`build_method` from `--set`-style values (strings or typed), parsed here into the method's Config."""
    return build_method(name, parse_config(METHODS[name].Config, options), spec, num_images, compute)
