"""Regional prompts in a request: a prompt per region of the image, by divisions or masks.
Parsing, validation and the per-cell weights both modes use. Imports nothing from Triton.

Inputs (all optional; `region_prompts` turns the others on):
  region_prompts           BYTES [R], 1 <= R <= max_regions (config parameter, default 8)
  region_negative_prompts  BYTES [R]; region r's negative prompt (default: the request's)
  region_divisions         BYTES [1], Regional Prompter's divide-ratio syntax (subset below), or
  region_masks             UINT8 [R, height, width]; 0 = outside, 255 = inside, between = partly
  base_prompt_weight       FP32 [1] in [0, 1], default 0.2: the share of `prompt` inside regions
  region_mode              BYTES [1]: "latent" (default) or "attention"

Divisions (Regional Prompter's "Columns" main split): `"1,1"` is one row of columns with ratios
1:1, left to right; with `;` every part is a row, top to bottom, written `row ratio, column
ratios...` (`"1,2;1,1,1"`: a top row of one cell over a bottom row of two halves; a row given by
its ratio alone is one cell). Ratios are positive decimal numbers. Regions are numbered row by
row, left to right, in the order of `region_prompts`, and there must be exactly R cells.
Not accepted (each is refused, never guessed): the "Rows" and "Random" main splits, prompt
keywords (BREAK, ADDCOMM, ADDBASE, ADDCOL, ADDROW: the whole-image prompt is `prompt`, region
prompts are an array), per-region base ratios, and Regional Prompter's broadcasting of too
few or too many ratios.

Weights: masks are made at pixel resolution; where regions overlap (their sum exceeds 1) they
are scaled to sum to 1; a pixel no region covers takes the base prompt. Averaged to the latent
grid (vae_factor pixels per cell), context 0 (the base prompt) gets U + b(1 - U) of a cell and
region r gets (1 - b) m_r, where U is the uncovered share and b the base weight: the K = R + 1
weights of every cell sum to 1.
"""

from collections.abc import Iterator
from dataclasses import dataclass
import math
from typing import Any

import numpy as np

from families.contracts import MAX_REGIONS
from serving.core.config import DEFAULT_BASE_WEIGHT, REGION_MODES
from serving.core.interfaces import Array
from serving.core.request import InvalidInput, decode_text, is_blank

MODES = REGION_MODES
DEFAULT_MODE = "latent"
REGIONAL_NETWORK = "regional"  # the UNet with region-weighted cross-attention (families/regional_unet.py)


@dataclass(frozen=True)
class RegionLimits:
    vae_factor: int  # pixels per latent cell
    max_regions: int = MAX_REGIONS
    default_base_weight: float = DEFAULT_BASE_WEIGHT
    default_mode: str = DEFAULT_MODE
    attention: bool = True  # whether the repository has the regional UNet

    @classmethod
    def from_config(cls, config: Any, pipeline_info: dict[str, Any]) -> "RegionLimits":
        """A served model's region limits: the pipeline's PipelineConfig (serving/core/config.py)
        over the model's pipeline.json facts (whether it has the regional UNet)."""
        limits = cls(
            vae_factor=int(pipeline_info["vae_factor"]),
            attention=bool(pipeline_info.get("regional_unet", False)),
            max_regions=config.max_regions,
            default_base_weight=config.default_base_prompt_weight,
            default_mode=config.default_region_mode,
        )
        if limits.default_mode == "attention" and not limits.attention:
            raise ValueError(
                "pipeline config.pbtxt parameter default_region_mode=attention needs the regional UNet; re-run ldm export"
            )
        return limits


@dataclass(frozen=True, eq=False)
class Regions:
    prompts: tuple[Any, ...]  # of str, one per region
    negative_prompts: tuple[Any, ...] | None  # of str, one per region; None: each takes the request's negative prompt
    weights: Array  # float32 [R + 1, h, w]: the base prompt's share of each latent cell, then each region's
    base_weight: float
    mode: str

    @property
    def count(self) -> int:
        return len(self.prompts)

    @property
    def network(self) -> str:
        """Latent mode's rows are ordinary text rows (they share calls with plain jobs); attention
        mode's rows need the regional UNet with K = R + 1 contexts per row, and only rows with the
        same K fit one input tensor."""
        return "base" if self.mode == "latent" else regional_network(self.count + 1)

    def texts_to_check(self) -> Iterator[tuple[str, str]]:
        """(field, text) of every region text, for the token-length check."""
        for i, text in enumerate(self.prompts):
            yield f"region_prompts[{i}]", text
        for i, text in enumerate(self.negative_prompts or ()):
            yield f"region_negative_prompts[{i}]", text


def regional_network(contexts: int) -> str:
    """The regional UNet taking `contexts` (K) contexts per row."""
    return f"{REGIONAL_NETWORK}/{contexts}"


def is_regional_network(network: str) -> bool:
    return network.startswith(REGIONAL_NETWORK + "/")


FIELDS = (
    "region_prompts",
    "region_negative_prompts",
    "region_divisions",
    "region_masks",
    "base_prompt_weight",
    "region_mode",
)


def parse_regions(inputs: dict[str, Any], limits: RegionLimits | None, height: int, width: int) -> Regions | None:
    """The request's regions, or None when it has no `region_prompts` (and no other region field).
    limits None: this pipeline serves no regions."""
    if limits is None:
        for name in FIELDS:
            if inputs.get(name) is not None:
                raise InvalidInput(name, "regional prompts are not served by this pipeline")
        return None
    prompts = _texts(inputs, "region_prompts", limits.max_regions)
    if prompts is None:
        for name in FIELDS[1:]:
            if inputs.get(name) is not None:
                raise InvalidInput(name, "needs region_prompts")
        return None
    negatives = _texts(inputs, "region_negative_prompts", limits.max_regions, allow_empty=True)
    if negatives is not None and len(negatives) != len(prompts):
        raise InvalidInput(
            "region_negative_prompts", f"must hold one text per region ({len(prompts)}), got {len(negatives)}"
        )
    has_masks, has_divisions = inputs.get("region_masks") is not None, inputs.get("region_divisions") is not None
    if has_masks and has_divisions:
        raise InvalidInput("region_masks", "give region_masks or region_divisions, not both")
    if has_masks:
        masks = _masks(inputs["region_masks"], len(prompts), height, width)
    elif has_divisions:
        masks = division_masks(_text(inputs, "region_divisions"), len(prompts), height, width)
    else:
        raise InvalidInput("region_divisions", "region_prompts need region_divisions or region_masks")
    base_weight = _base_weight(inputs, limits.default_base_weight)
    mode = _text(inputs, "region_mode") if inputs.get("region_mode") is not None else limits.default_mode
    if mode not in MODES:
        raise InvalidInput("region_mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "attention" and not limits.attention:
        raise InvalidInput(
            "region_mode",
            "attention needs the regional UNet, which this model repository was exported "
            "without (re-run ldm export); latent works",
        )
    return Regions(
        tuple(prompts),
        None if negatives is None else tuple(negatives),
        region_weights(masks, base_weight, limits.vae_factor),
        base_weight,
        mode,
    )


def region_weights(masks: Array, base_weight: float, vae_factor: int) -> Array:
    """float32 [R + 1, h, w] from pixel masks [R, H, W] in [0, 1] (see the module docstring)."""
    masks = masks.astype(np.float64)
    total = masks.sum(axis=0)
    masks = masks / np.maximum(total, 1.0)  # overlaps share their pixel
    count, height, width = masks.shape
    f = vae_factor
    cells = masks.reshape(count, height // f, f, width // f, f).mean(axis=(2, 4))
    uncovered = np.clip(1.0 - cells.sum(axis=0), 0.0, 1.0)
    base = uncovered + base_weight * (1.0 - uncovered)
    out: Array = np.concatenate([base[None], (1.0 - base_weight) * cells]).astype(np.float32)
    return out


def division_masks(divisions: str, count: int, height: int, width: int) -> Array:
    """float32 [count, height, width] 0/1 masks of the cells of a divisions string."""
    rows = _division_rows(divisions)
    cells = sum(len(columns) for _, columns in rows)
    if cells != count:
        raise InvalidInput("region_divisions", f"{divisions!r} makes {cells} regions; region_prompts has {count}")
    masks = np.zeros((count, height, width), np.float32)
    row_edges = _edges([ratio for ratio, _ in rows], height)
    index = 0
    for (top, bottom), (_, columns) in zip(row_edges, rows):
        for left, right in _edges(columns, width):
            if bottom <= top or right <= left:
                raise InvalidInput(
                    "region_divisions", f"region {index} of {divisions!r} gets no pixels at {width}x{height}"
                )
            masks[index, top:bottom, left:right] = 1.0
            index += 1
    return masks


def _division_rows(divisions: str) -> list[Any]:
    """[(row ratio, [column ratios])] of the accepted syntax; anything else is refused."""
    if ";" not in divisions:
        return [(1.0, _ratios(divisions, divisions))]
    rows = []
    for part in divisions.split(";"):
        ratios = _ratios(part, divisions)
        rows.append((ratios[0], ratios[1:] or [1.0]))
    return rows


def _ratios(part: str, whole: str) -> list[Any]:
    values = []
    for item in part.split(","):
        try:
            value = float(item.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise InvalidInput(
                "region_divisions",
                f'{whole!r}: {item.strip()!r} is not a positive number (accepted: ratios like "1,1" or "1,2;1,1,1")',
            )
        values.append(value)
    return values


def _edges(ratios: list[Any], size: int) -> list[Any]:
    """Pixel [start, end) of each part when `size` is split by `ratios`."""
    bounds = np.round(np.cumsum([0.0] + ratios) / sum(ratios) * size).astype(int)
    return list(zip(bounds[:-1], bounds[1:]))


def _texts(inputs: dict[str, Any], name: str, limit: int, allow_empty: bool = False) -> list[str] | None:
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim != 1 or not 1 <= array.size <= limit:
        raise InvalidInput(name, f"must be a list of 1 to {limit} texts (BYTES [R]), got shape {list(array.shape)}")
    texts = []
    for i, item in enumerate(array):
        text = decode_text(f"{name}[{i}]", item)
        if not allow_empty and is_blank(text):
            raise InvalidInput(name, f"text {i} must not be empty")
        texts.append(text)
    return texts


def _text(inputs: dict[str, Any], name: str) -> str:
    array = np.asarray(inputs[name])
    if array.size != 1:
        raise InvalidInput(name, f"must hold exactly one value, got shape {list(array.shape)}")
    return decode_text(name, array.reshape(-1)[0])


def _masks(value: Any, count: int, height: int, width: int) -> Array:
    array = np.asarray(value)
    if array.dtype != np.uint8:
        raise InvalidInput("region_masks", f"must be UINT8 (0 outside, 255 inside), got {array.dtype}")
    if array.shape != (count, height, width):
        raise InvalidInput(
            "region_masks",
            f"must have shape [{count}, {height}, {width}] (regions, height, width), got {list(array.shape)}",
        )
    empty = [i for i in range(count) if not array[i].any()]
    if empty:
        raise InvalidInput("region_masks", f"region {empty[0]} is empty (all zeros)")
    masks: Array = array.astype(np.float32) / 255.0
    return masks


def _base_weight(inputs: dict[str, Any], default: float) -> float:
    value = inputs.get("base_prompt_weight")
    if value is None:
        return default
    array = np.asarray(value)
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        raise InvalidInput("base_prompt_weight", f"must be one number in [0, 1], got shape {list(array.shape)}")
    weight = float(array.reshape(-1)[0])
    if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
        raise InvalidInput("base_prompt_weight", f"must be a finite number in [0.0, 1.0], got {weight}")
    return weight
