"""Synthesis methods, one file each. `METHODS` maps the CLI name to the class."""
from __future__ import annotations

from dfkd.common.accel import Compute
from dfkd.common.input_spec import InputSpec

from .base import SynthesisMethod, make_config, parse_config
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


def build_method(name: str, options: object, spec: InputSpec, num_images: int,
                 compute: Compute | None = None) -> SynthesisMethod:
    """The method `name` with its config (`options`: an instance of its Config, or a dict of `--set` values
    to parse into one) sized for `num_images` images, computing as `compute` says (default: the CPU, no
    speed switches)."""
    cls = METHODS[name]
    config = options if type(options) is cls.Config else parse_config(cls.Config, options)
    if hasattr(config, "for_input"):  # defaults that depend on the teacher's input ("auto")
        config = config.for_input(spec)
    if hasattr(config, "for_images"):
        config = config.for_images(num_images)
    method = cls(config, spec)
    if compute is not None:
        method.compute = compute
    return method
