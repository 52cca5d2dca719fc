"""Model families: everything that differs between kinds of diffusion pipelines, one module each
(families/sd.py, families/sdxl.py, families/flux.py), read by export (contracts, torch wrappers) and by serving (text
encoding, per-row denoiser inputs, request fields). This package is the bottom layer: it imports
nothing from export/ or serving/. How to add a family: docs/extending.md.
"""

from families.flux import Flux
from families.sd import StableDiffusion
from families.sdxl import StableDiffusionXL

FAMILIES = {family.name: family for family in (StableDiffusion(), StableDiffusionXL(), Flux())}


def family_of(model_index: dict, path=None):
    """The family serving a pipeline folder, by its model_index.json `_class_name`."""
    pipeline = model_index.get("_class_name", "")
    for family in FAMILIES.values():
        if pipeline in family.pipelines:
            family.check(model_index, path)
            return family
    served = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
    raise ValueError(f"{path or 'checkpoint'}: pipeline class {pipeline!r} is not served; families serve: {served}")


def torch_module(component: str, info):
    """The torch module of a checkpoint's component (its family's wrapper), eval mode, float32."""
    return FAMILIES[info.family].torch_module(component, info)
