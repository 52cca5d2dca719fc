"""Samplers per request: each a pure, vectorised update with per-job state.

A `Sampler` is made once per served checkpoint (its scheduler config) and shared by every job;
what a job walks through is its own `SamplerRun` (schedule position and the history a multistep
solver keeps), so concurrent jobs never share mutable state (the trap of diffusers #7851). The
runner makes one UNet call for the rows of all jobs whatever their samplers, then hands each
sampler the rows of its jobs. Plain numpy: imports nothing from torch or Triton.
"""

from serving.core.samplers.base import Sampler, SamplerRun
from serving.core.samplers.registry import (
    A1111_NAMES,
    SAMPLERS,
    SIGMA_SCHEDULES,
    default_sampler_name,
    describe_samplers,
    make_sampler,
    resolve_name,
)

__all__ = [
    "A1111_NAMES",
    "SAMPLERS",
    "SIGMA_SCHEDULES",
    "Sampler",
    "SamplerRun",
    "default_sampler_name",
    "describe_samplers",
    "make_sampler",
    "resolve_name",
]
