"""Prompt adherence: read an image back into objects and check a scene's attributes on it.

The reader knows only the palette, never the scene: each pixel goes to its nearest palette
colour (or to none if it is far from all), the background is the commonest colour on the
border, and each 4-connected region of an object colour (above a minimum area) is an object.
A region must have interior pixels (all four neighbours in it), so the 1-pixel seams of blended
colour along an edge are not read as objects. A triangle (pointing up) is the region with 3/4 of
its pixels in the lower half of its bounding box; circles and squares are symmetric, and a square
fills the corners of its box where a circle leaves them empty (a fill ratio pi/4 vs 1 does not
separate them: a small circle's box is only ~10 pixels wide). Size comes from the bounding-box extent, position
from the bounding-box centre.
"""

from typing import Any
from collections import deque
from dataclasses import dataclass

import numpy as np

from training.data import BACKGROUND_COLOURS, IMAGE_SIZE, OBJECT_COLOURS, SIZES, Scene

_NAMES = list(OBJECT_COLOURS) + list(BACKGROUND_COLOURS)
_PALETTE = np.array([OBJECT_COLOURS.get(n) or BACKGROUND_COLOURS[n] for n in _NAMES], np.float32)
MAX_COLOUR_DISTANCE = 90.0  # farther than this from every palette colour: belongs to none
MIN_AREA = 20  # pixels; the smallest rendered object (small triangle) has ~50
MIN_INTERIOR = 6  # interior pixels; a small triangle has ~25
TRIANGLE_LOWER_HALF = 0.63  # share of pixels in the lower half of the box: 3/4 vs 1/2
SQUARE_CORNERS = 0.5  # share of the box's corner blocks filled: square >= 3/4, circle <= 1/4
LARGE_EXTENT = SIZES["small"] + SIZES["large"]  # bounding-box side between 2x6 and 2x12 px
CENTRE_RADIUS = 8  # |offset| below this on both axes from the image centre is "centre"


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    area: int

    @property
    def position(self) -> str:
        dx, dy = self.cx - IMAGE_SIZE / 2, self.cy - IMAGE_SIZE / 2
        if abs(dx) < CENTRE_RADIUS and abs(dy) < CENTRE_RADIUS:
            return "centre"
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


def _regions(mask: np.ndarray):
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        yield pixels


def _interior(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def read_regions(image: np.ndarray):
    """uint8 [H, W, 3] -> (background name or None, [(colour name, shape, size, ys, xs, box)]):
    each object region read (palette colour, size filters), its shape and size by this
    evaluator's rules, its pixels' coordinates and its bounding box's mask."""
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _PALETTE, axis=-1)
    labels = np.where(dist.min(-1) <= MAX_COLOUR_DISTANCE, dist.argmin(-1), -1)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    background = _NAMES[np.bincount(border).argmax()] if len(border) else None
    regions = []
    for index, name in enumerate(_NAMES):
        if name == background:
            continue
        mask = labels == index
        interior = _interior(mask)
        for pixels in _regions(mask):
            ys, xs = np.array(pixels).T
            if len(pixels) < MIN_AREA or interior[ys, xs].sum() < MIN_INTERIOR:
                continue
            bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            lower = np.mean(ys + 0.5 > (ys.min() + ys.max() + 1) / 2)
            box = np.zeros((bh, bw), bool)
            box[ys - ys.min(), xs - xs.min()] = True
            k = max(2, min(bw, bh) // 6)
            corners = np.mean([box[:k, :k], box[:k, -k:], box[-k:, :k], box[-k:, -k:]])
            shape = "triangle" if lower >= TRIANGLE_LOWER_HALF else "square" if corners >= SQUARE_CORNERS else "circle"
            size = "large" if max(bw, bh) >= LARGE_EXTENT else "small"
            regions.append((name, shape, size, ys, xs, box))
    return background, regions


def read_image(image: np.ndarray):
    """uint8 [H, W, 3] -> (background name or None, list of Detected, largest first)."""
    background, regions = read_regions(image)
    objects = [
        Detected(name, shape, size, (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, len(xs))
        for name, shape, size, ys, xs, _ in regions
    ]
    return background, sorted(objects, key=lambda o: -o.area)


def _relation(a: Detected, b: Detected) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def check(scene: Scene, image: np.ndarray, read=None) -> dict:
    """Attribute name -> bool, for every attribute the scene's caption states, as `read`
    (default read_image: (background, objects largest first)) reads the image."""
    background, found = (read or read_image)(image)
    result = {"background": background == scene.background, "count": len(found) == len(scene.objects)}
    if len(scene.objects) == 1:
        want, got = scene.objects[0], (found[0] if found else None)
        result["colour"] = got is not None and got.colour == want.colour
        result["shape"] = got is not None and got.shape == want.shape
        result["size"] = got is not None and got.size == scene.size
        result["position"] = got is not None and got.position == scene.position
        return result
    # Two objects have different colours: find each by its colour.
    by_colour = {}
    for obj in found:  # largest first, so a stray speck does not replace the real object
        by_colour.setdefault(obj.colour, obj)
    matched: list[Any] = [by_colour.get(o.colour) for o in scene.objects]
    for i, (want, got) in enumerate(zip(scene.objects, matched)):
        result[f"colour {i + 1}"] = got is not None
        result[f"shape {i + 1}"] = got is not None and got.shape == want.shape
    result["relation"] = None not in matched and _relation(*matched) == scene.relation
    return result


def score(scenes, images) -> dict:
    """Attribute accuracy (all stated attributes pooled), whole-prompt accuracy, and which
    prompts passed (in order, for paired comparisons)."""
    checks = [check(s, im) for s, im in zip(scenes, images)]
    attributes = [v for c in checks for v in c.values()]
    passed = [all(c.values()) for c in checks]
    return {
        "attribute_accuracy": float(np.mean(attributes)),
        "prompt_accuracy": float(np.mean(passed)),
        "count": len(checks),
        "passed": passed,
    }
