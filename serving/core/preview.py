"""Cheap previews: a linear map from latent channels to RGB at latent resolution.

Running the VAE decoder for every preview would cost as much as a denoising step; a per-
checkpoint linear fit (made at export time, `export/preview_fit.py`) costs a few multiplies.
"""

from typing import Any

import numpy as np

from serving.core.interfaces import Array


class LatentPreview:
    def __init__(self, weights: Any, bias: Any) -> None:
        self.weights = np.asarray(weights, dtype=np.float32)  # [C, 3]
        self.bias = np.asarray(bias, dtype=np.float32)  # [3]

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "LatentPreview | None":
        fit = info.get("preview")
        return cls(fit["weights"], fit["bias"]) if fit else None

    def __call__(self, latents: Array) -> Array:
        """uint8 [h, w, 3] from latents [C, h, w]."""
        rgb = np.einsum("chw,ck->hwk", latents.astype(np.float32), self.weights) + self.bias
        out: Array = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
        return out


class ModelPreviews:
    """The preview map of each model a pipeline serves (their VAEs differ): (pred_x0, model) ->
    uint8 image, or None for a model whose export has no fit."""

    def __init__(self, previews: dict[str, Any]):
        self.previews = previews  # model name -> LatentPreview or None

    def __call__(self, latents: Array, model: str) -> Array | None:
        preview = self.previews.get(model)
        return None if preview is None else preview(latents)
