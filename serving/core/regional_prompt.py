"""Regional prompts as UNet rows and a rule that combines them (the mechanism of
serving/core/conditioning.py), in the two modes of serving/core/regions.py.

Contexts k = 0..R: the base prompt, then each region's prompt; W_k [h, w] its share of every
latent cell (they sum to 1); n_k the negative prompt it is guided against (the request's, or the
region's own), g the guidance scale.

Latent mode (latent couple): one conditional row per context and one unconditional row per
distinct negative prompt, all in the same UNet call as every other job's rows (R + 2 rows with
guidance and no region negatives); eps = sum_k W_k (u_{n_k} + g (c_k - u_{n_k})), which with one
negative prompt is uncond + g sum_k W_k (c_k - uncond).
Attention mode: two rows (one without guidance), each with all K contexts (the unconditional row
with the negatives n_k), to the regional UNet, whose cross-attention mixes the contexts by W;
then classifier-free guidance as for a plain prompt.
"""

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from serving.core.conditioning import TextConditioning, TextPrompt, negative_text, stack
from serving.core.interfaces import Array
from serving.core.regions import Regions, regional_network
from serving.core.request import InvalidInput


@dataclass(frozen=True)
class RegionalConditioning:
    cond: dict[str, Any]  # input name -> [K, ...]: base prompt, then each region
    uncond: dict[str, Any] | None  # input name -> [N, ...]: the distinct negative prompts; None without guidance
    negative_of: Array | None  # [K]: the uncond row each context is guided against
    weights: Array  # [K, h, w]
    guidance_scale: float
    network = "base"  # latent mode's rows are ordinary text rows

    @property
    def rows(self) -> int:
        return len(self.weights) + (0 if self.uncond is None else self.negatives)

    @property
    def negatives(self) -> int:
        assert self.uncond is not None  # with guidance only
        return len(next(iter(self.uncond.values())))

    def inputs(self) -> dict[str, Any]:
        if self.uncond is None:
            return self.cond
        return {name: np.concatenate([self.cond[name], self.uncond[name]]) for name in self.cond}

    def unguided(self) -> "RegionalConditioning":
        """Only the conditional rows (outside a guidance interval): the regions' weighted sum."""
        return replace(self, uncond=None, negative_of=None)

    def combine(self, predictions: Array) -> Array:
        count = len(self.weights)
        guided = predictions[:count]
        if self.uncond is not None:
            uncond = predictions[count:][self.negative_of]
            guided = uncond + np.float32(self.guidance_scale) * (guided - uncond)
        out: Array = (self.weights[:, None] * guided).sum(axis=0)
        return out


@dataclass(frozen=True)
class RegionalAttentionConditioning(TextConditioning):
    """cond and uncond are embeddings whose context is [K, L, D]: each row carries all contexts to
    the regional UNet; with the region weights [rows, K, h, w] (both rows mix their contexts alike)."""

    weights: Array  # [K, h, w]

    @property
    def network(self) -> str:  # type: ignore[override]  # the base class's is a class attribute
        return regional_network(len(self.weights))

    def inputs(self) -> dict[str, Any]:
        return {**super().inputs(), "region_weights": np.broadcast_to(self.weights, (self.rows, *self.weights.shape))}


@dataclass(frozen=True)
class RegionalPrompt(TextPrompt):
    """Latent mode: the whole-image prompt with regions."""

    regions: Regions

    @property
    def negatives(self) -> list[Any]:
        """The negative prompt of each context."""
        return [self.negative_prompt] + list(
            self.regions.negative_prompts or [self.negative_prompt] * self.regions.count
        )

    def _distinct_negatives(self) -> list[Any]:
        return list(dict.fromkeys(self.negatives))

    @property
    def rows(self) -> int:
        return self.regions.count + 1 + (len(self._distinct_negatives()) if self.uses_guidance else 0)

    def texts(self) -> list[Any]:
        texts = [self.prompt, *self.regions.prompts]
        return texts + [negative_text(n) for n in self._distinct_negatives()] if self.uses_guidance else texts

    def build(self, embeddings: list[Any]) -> RegionalConditioning:  # type: ignore[override]  # another conditioning kind
        count = self.regions.count + 1
        cond = stack(embeddings[:count])
        if not self.uses_guidance:
            return RegionalConditioning(cond, None, None, self.regions.weights, self.guidance_scale)
        distinct = self._distinct_negatives()
        negative_of = np.array([distinct.index(n) for n in self.negatives])
        return RegionalConditioning(
            cond, stack(embeddings[count:]), negative_of, self.regions.weights, self.guidance_scale
        )


@dataclass(frozen=True)
class RegionalAttentionPrompt(RegionalPrompt):
    """Attention mode."""

    @property
    def network(self) -> str:  # type: ignore[override]  # the base class's is a class attribute
        return self.regions.network

    @property
    def rows(self) -> int:
        return 2 if self.uses_guidance else 1

    def texts(self) -> list[Any]:
        texts = [self.prompt, *self.regions.prompts]
        return texts + [negative_text(n) for n in self.negatives] if self.uses_guidance else texts

    def build(self, embeddings: list[Any]) -> RegionalAttentionConditioning:  # type: ignore[override]  # another conditioning kind
        count = self.regions.count + 1
        uncond = stack(embeddings[count:]) if self.uses_guidance else None
        return RegionalAttentionConditioning(
            stack(embeddings[:count]), uncond, self.guidance_scale, self.regions.weights
        )


def regional_prompt(request: Any) -> RegionalPrompt:
    """The prompt spec of a request with regions (a GenerationRequest whose `regions` is set)."""
    kind = RegionalPrompt if request.regions.mode == "latent" else RegionalAttentionPrompt
    return kind(request.prompt, request.negative_prompt, request.guidance_scale, request.regions)


def check_regional_job(job: Any, check_tokens: Any, max_rows: int, limits: Any = None) -> None:
    """Refuses a regional job whose texts are too long for the text encoder, whose rows would
    not fit one UNet call (the scheduler never splits a job's rows), or in attention mode on a
    model without the regional UNet (`limits`: its model's RegionLimits)."""
    regions = job.request.regions
    if regions is None:
        return
    if regions.mode == "attention" and limits is not None and not limits.attention:
        raise InvalidInput(
            "region_mode",
            f"attention needs the regional UNet, which model {job.model!r} does not have; use region_mode latent",
        )
    if regions.mode == "attention" and job.variant != "base":
        raise InvalidInput(
            "region_mode",
            f"attention needs the base UNet (the regional UNet is exported from it); "
            f"a {job.variant} request takes region_mode latent",
        )
    for field, text in regions.texts_to_check():
        check_tokens(field, text)
    if job.rows > max_rows:
        raise InvalidInput(
            "region_prompts",
            f"{regions.count} regions in {regions.mode} mode need {job.rows} UNet rows per step; this server "
            f"allows at most max_rows={max_rows} (use fewer regions, region_mode attention, or no region negatives)",
        )
