"""What a job's UNet rows condition on, and how their noise predictions become the job's own.

One mechanism serves every request kind: a job contributes R rows to the step's UNet call (one
text context per row) and a rule that combines those R predictions into one noise estimate. The
scheduler sees only R; the runner builds the rows and applies each job's rule; each job's sampler
updates its latents from the result (serving/core/samplers/). Plain text-to-image is R = 2
(conditional, unconditional) with classifier-free guidance as its rule, or R = 1 without guidance
(or outside the job's guidance interval: `unguided`).

A *prompt* (before encoding) names the texts it needs; `build` turns their embeddings into the
*conditioning* the runner uses. Both are immutable, so replacing a job's conditioning between
steps is one assignment. An embedding is a dict of the denoiser inputs one text gives (its
context `encoder_hidden_states`, and the family's pooled inputs such as SDXL's `text_embeds`);
a conditioning's `inputs` stacks them over its rows, and the runner concatenates every job's
inputs by name into one denoiser call. An empty negative prompt is the text None: the
family's unconditional embedding (serving/core/text.py).
"""

from typing import Any
from dataclasses import dataclass, replace

import numpy as np

from serving.core.interfaces import Array
from serving.core.sampler import guided_noise


def stack(embeddings: list[Any]) -> dict[str, Any]:
    """Embeddings (dicts of per-text values) -> input name -> [len(embeddings), ...]."""
    return {name: np.stack([e[name] for e in embeddings]) for name in embeddings[0]}


def negative_text(text: str) -> str | None:
    """The text a negative prompt encodes: None (the unconditional embedding) when it is empty."""
    return text if text else None


@dataclass(frozen=True)
class TextConditioning:
    cond: dict[str, Any]  # embedding of the prompt
    uncond: dict[str, Any] | None  # embedding of the negative prompt; None without guidance
    guidance_scale: float
    # which network of the job's variant its rows go to (serving/core/job.py `Job.network`)
    network = "base"

    @property
    def rows(self) -> int:
        return 1 if self.uncond is None else 2

    def inputs(self) -> dict[str, Any]:
        """Input name -> [rows, ...]: the conditional row first."""
        return stack([self.cond] if self.uncond is None else [self.cond, self.uncond])

    def unguided(self) -> "TextConditioning":
        """The same conditioning without its unconditional row (outside a guidance interval)."""
        return replace(self, uncond=None)

    def combine(self, predictions: Array) -> Array:
        """[rows, C, h, w] predictions of this job's rows -> its noise estimate [C, h, w]."""
        if self.uncond is None:
            out: Array = predictions[0]
            return out
        out = guided_noise(predictions[1:2], predictions[0:1], np.array([self.guidance_scale]))[0]
        return out


@dataclass(frozen=True)
class TrueCfgConditioning:
    """Flux's rule (families/flux.py): one conditional row, and the negative prompt's row only with
    true CFG; where the checkpoint is guidance-distilled every row carries guidance_scale as the
    denoiser's `guidance` input."""

    cond: dict[str, Any]
    uncond: dict[str, Any] | None  # the negative prompt's embedding with true CFG, else None
    true_cfg_scale: float
    guidance: float | None  # the guidance input of each row; None: the model takes none
    network = "base"

    @property
    def rows(self) -> int:
        return 1 if self.uncond is None else 2

    def inputs(self) -> dict[str, Any]:
        inputs = stack([self.cond] if self.uncond is None else [self.cond, self.uncond])
        if self.guidance is not None:
            inputs["guidance"] = np.full(self.rows, self.guidance, np.float32)
        return inputs

    def unguided(self) -> "TrueCfgConditioning":
        return replace(self, uncond=None)

    def combine(self, predictions: Array) -> Array:
        if self.uncond is None:
            out: Array = predictions[0]
            return out
        out = guided_noise(predictions[1:2], predictions[0:1], np.array([self.true_cfg_scale]))[0]
        return out


@dataclass(frozen=True)
class TrueCfgPrompt:
    prompt: str
    negative_prompt: str
    guidance_scale: float
    true_cfg_scale: float
    guidance_input: bool
    network = "base"

    @property
    def uses_guidance(self) -> bool:
        # as FluxPipeline: true CFG needs a scale above 1 and a negative prompt
        return self.true_cfg_scale > 1.0 and bool(self.negative_prompt)

    @property
    def rows(self) -> int:
        return 2 if self.uses_guidance else 1

    def texts(self) -> list[Any]:
        return [self.prompt, self.negative_prompt] if self.uses_guidance else [self.prompt]

    def build(self, embeddings: list[Any]) -> TrueCfgConditioning:
        return TrueCfgConditioning(
            embeddings[0],
            embeddings[1] if self.uses_guidance else None,
            self.true_cfg_scale,
            self.guidance_scale if self.guidance_input else None,
        )


@dataclass(frozen=True)
class TextPrompt:
    prompt: str
    negative_prompt: str
    guidance_scale: float
    network = "base"  # as its conditioning's

    @property
    def uses_guidance(self) -> bool:
        # as diffusers: a scale of 1 or less means the conditional prediction alone
        return self.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        return 2 if self.uses_guidance else 1

    def texts(self) -> list[Any]:
        """The texts to encode, in the order `build` takes their embeddings."""
        return [self.prompt, negative_text(self.negative_prompt)] if self.uses_guidance else [self.prompt]

    def build(self, embeddings: list[Any]) -> TextConditioning:
        uncond = embeddings[1] if self.uses_guidance else None
        return TextConditioning(embeddings[0], uncond, self.guidance_scale)
