"""Synthesis methods, one file each. `METHODS` maps the CLI name to the class."""
from __future__ import annotations

from common.models import InputSpec

from .base import SynthesisMethod, parse_config
from .generator import GeneratorEnsemble
from .noise import GaussianNoise

METHODS: dict[str, type[SynthesisMethod]] = {
    GeneratorEnsemble.name: GeneratorEnsemble,
    GaussianNoise.name: GaussianNoise,
}


def build_method(name: str, options: dict, spec: InputSpec) -> SynthesisMethod:
    cls = METHODS[name]
    return cls(parse_config(cls.Config, options), spec)
