"""Regional-prompt adherence on the default model: layouts, seeded scenes, and an evaluator that
checks every region of an image holds its prompt's object and nothing of another region's.

A layout splits the 64x64 canvas into regions (Regional Prompter divisions, or masks of irregular
shape). A scene gives every region one object of its own colour (seen colour-shape combinations,
all colours different) and a one-object prompt from the training grammar:
"a {size} {colour} {shape} {position} a {bg} background", with a position that lies inside the
region. The grammar knows five positions (left, right, top, bottom, centre), so a layout can be
asked for only where each region contains one of them; a quadrant contains none, so the quadrant
layout (reported, no target) asks for "at the top of" / "at the bottom of" and checks that the
objects land on the right side of the vertical split. The whole-image prompt is the grammar's
two-object caption of two of the regions' objects.

The evaluator (training/evaluate.py's reader, no knowledge of the scene) finds the objects, puts
each in the region that covers the centre of its box, and calls region r right when an object of
r's colour is there with r's shape and no object of another region's colour is there. An image is
right when every region is, the background is, and it holds no other objects.
"""

from typing import Any
from dataclasses import dataclass

import numpy as np

from serving.core.regions import division_masks
from training.data import (
    BACKGROUND_COLOURS,
    HELD_OUT_COMBOS,
    IMAGE_SIZE,
    OBJECT_COLOURS,
    POSITION_JITTER,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
    Obj,
    Scene,
)
from training.evaluate import _relation, read_image

SMALL = "small"


@dataclass(frozen=True)
class Layout:
    name: str
    positions: tuple  # per region: the grammar positions that lie inside it
    divisions: str | None = None  # Regional Prompter syntax; None: `mask` draws the masks
    mask: str | None = None  # "disc" or "L"
    large_objects: bool = False  # regions big enough for the grammar's large objects
    base_pair: tuple = (0, 1)  # the two regions the whole-image caption describes
    anchors: tuple | None = None  # per region: where ground-truth renders put its object (default: the position)
    target: float | None = None  # per-region accuracy required (None: reported)

    @property
    def count(self) -> int:
        return len(self.positions)

    def masks(self) -> np.ndarray:
        """uint8 [R, 64, 64]: 255 inside."""
        if self.divisions is not None:
            return (division_masks(self.divisions, self.count, IMAGE_SIZE, IMAGE_SIZE) * 255).astype(np.uint8)
        y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] + 0.5
        if self.mask == "disc":  # a disc in the centre, and everything around it
            inside = (x - 32) ** 2 + (y - 32) ** 2 <= DISC_RADIUS**2
        elif self.mask == "L":  # the left column and the bottom row, and the top-right rest
            inside = (x < 24) | (y >= 40)
        else:
            raise ValueError(f"unknown mask {self.mask!r}")
        return (np.stack([inside, ~inside]) * 255).astype(np.uint8)


DISC_RADIUS = 10
QUADRANT_CENTRES = ((16, 16), (48, 16), (16, 48), (48, 48))
LAYOUTS = (
    Layout("halves", (("left",), ("right",)), divisions="1,1", large_objects=True, target=0.90),
    Layout("three columns", (("left",), ("centre",), ("right",)), divisions="1,1,1", base_pair=(0, 2), target=0.80),
    Layout(
        "row over two columns", (("top",), ("left",), ("right",)), divisions="3;5,1,1", base_pair=(1, 2), target=0.80
    ),
    Layout(
        "row, two columns, row",
        (("top",), ("left",), ("right",), ("bottom",)),
        divisions="3;2,1,1;3",
        base_pair=(0, 3),
        target=0.80,
    ),
    Layout(
        "quadrants", (("top",), ("top",), ("bottom",), ("bottom",)), divisions="1,1,1;1,1,1", anchors=QUADRANT_CENTRES
    ),
    Layout("disc", (("centre",), ("left", "right", "top", "bottom")), mask="disc"),
    Layout("L", (("left", "bottom"), ("right", "top")), mask="L"),
)


@dataclass(frozen=True)
class RegionScene:
    layout: Layout
    background: str
    objects: tuple  # of training.data.Obj, one per region (ground-truth placement)
    sizes: tuple
    positions: tuple

    @property
    def region_prompts(self) -> list:
        bg = f"a {self.background} background"
        return [
            f"a {size} {o.colour} {o.shape} {POSITIONS[p][0]} {bg}"
            for o, size, p in zip(self.objects, self.sizes, self.positions)
        ]

    @property
    def base_prompt(self) -> str:
        """The grammar's two-object caption of the layout's base pair, related as they are placed."""
        i, j = self.layout.base_pair
        a, b = self.objects[i], self.objects[j]
        relation = RELATIONS[_relation(a, b)][0]
        return f"a {a.colour} {a.shape} {relation} a {b.colour} {b.shape} on a {self.background} background"

    @property
    def scene(self) -> Scene:
        """For training.data.render: the ground truth of this layout."""
        return Scene(self.background, self.objects)

    def request_fields(self) -> dict:
        """The region fields of this scene's request (LdmClient / request_arrays names)."""
        fields: dict[str, Any] = {"region_prompts": self.region_prompts}
        if self.layout.divisions is not None:
            fields["region_divisions"] = self.layout.divisions
        else:
            fields["region_masks"] = self.layout.masks()
        return fields


def region_scenes(layout: Layout, count: int, seed: int = 4321) -> list:
    """`count` fixed scenes of `layout`, the same for every run."""
    rng = np.random.default_rng([seed, LAYOUTS.index(layout)])
    combos = [(c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in HELD_OUT_COMBOS]
    scenes = []
    for _ in range(count):
        background = sorted(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
        colours = rng.permutation(sorted(OBJECT_COLOURS))[: layout.count]
        objects, sizes, positions = [], [], []
        for r, colour in enumerate(colours):
            shapes = [s for c, s in combos if c == colour]
            shape = shapes[rng.integers(len(shapes))]
            free = [p for p in layout.positions[r] if p not in positions] or list(layout.positions[r])
            position = free[rng.integers(len(free))]
            size = sorted(SIZES)[rng.integers(len(SIZES))] if layout.large_objects else SMALL
            x, y = layout.anchors[r] if layout.anchors else POSITIONS[position][1:]
            jx, jy = rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, size=2)
            half = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
            objects.append(Obj(str(colour), shape, float(x + jx), float(y + jy), float(half)))
            sizes.append(size)
            positions.append(position)
        scenes.append(RegionScene(layout, background, tuple(objects), tuple(sizes), tuple(positions)))
    return scenes


def check_regions(scene: RegionScene, image: np.ndarray, masks: np.ndarray | None = None) -> dict:
    """Per region: colour, shape, clean (nothing of another region's colour), passed; and the
    whole image's verdict."""
    masks = scene.layout.masks() if masks is None else masks
    background, found = read_image(image)
    colours = [o.colour for o in scene.objects]
    placed = {r: [] for r in range(len(colours))}
    for obj in found:
        y, x = min(int(obj.cy), IMAGE_SIZE - 1), min(int(obj.cx), IMAGE_SIZE - 1)
        if masks[:, y, x].max() > 0:
            placed[int(masks[:, y, x].argmax())].append(obj)
    regions = []
    for r, want in enumerate(scene.objects):
        mine = [o for o in placed[r] if o.colour == want.colour]  # largest first
        colour = bool(mine)
        shape = colour and mine[0].shape == want.shape
        clean = not any(o.colour in colours and o.colour != want.colour for o in placed[r])
        regions.append({"colour": colour, "shape": shape, "clean": clean, "passed": colour and shape and clean})
    whole = all(r["passed"] for r in regions) and background == scene.background and len(found) == len(colours)
    return {"regions": regions, "background": background == scene.background, "whole": whole}


def score_regions(scenes, images) -> dict:
    checks = [check_regions(s, im) for s, im in zip(scenes, images)]
    regions = [r for c in checks for r in c["regions"]]
    return {
        "region_accuracy": float(np.mean([r["passed"] for r in regions])),
        "colour": float(np.mean([r["colour"] for r in regions])),
        "shape": float(np.mean([r["shape"] for r in regions])),
        "clean": float(np.mean([r["clean"] for r in regions])),
        "image_accuracy": float(np.mean([c["whole"] for c in checks])),
        "count": len(checks),
    }


def evaluator_accuracy(count: int = 200) -> float:
    """Whole-image accuracy of the evaluator on ground-truth renders of every layout."""
    from training.data import render

    passed = [
        check_regions(s, render(s.scene))["whole"] for layout in LAYOUTS for s in region_scenes(layout, count, seed=99)
    ]
    return float(np.mean(passed))


SINGLE_CAPTION = "single caption"


def regional_adherence(
    generate,
    count: int,
    modes=("latent", "attention"),
    guidance_scale: float = 5.0,
    steps: int = 25,
    base_weight: float = 0.2,
    layouts=LAYOUTS,
) -> dict:
    """{(layout name, mode): score, with the images}; scene i of a layout uses seed i in every
    mode. `generate` is a ReferenceGenerator or a ServiceGenerator (below). For halves, mode
    SINGLE_CAPTION is the whole-image caption alone, without regions, for comparison."""
    results = {}
    for layout in layouts:
        scenes = region_scenes(layout, count)
        seeds = list(range(count))
        for mode in modes:
            images = generate.regional(scenes, seeds, mode, guidance_scale, steps, base_weight)
            results[(layout.name, mode)] = {**score_regions(scenes, images), "images": images}
        if layout.name == "halves":
            images = generate.plain([s.base_prompt for s in scenes], seeds, guidance_scale, steps)
            results[(layout.name, SINGLE_CAPTION)] = {**score_regions(scenes, images), "images": images}
    return results


class ReferenceGenerator:
    """In process: the diffusers components (training/regional_generate.py)."""

    def __init__(self, pipe, batch: int = 16):
        import torch

        from training.regional_generate import RegionalReference

        # torch's OpenMP threads spin when another process holds a core: on this machine's 2
        # shared cores one thread took 0.7 s per image, two threads 7.7 s
        torch.set_num_threads(1)
        self.reference = RegionalReference(pipe)
        self.batch = batch

    def regional(self, scenes, seeds, mode, guidance_scale, steps, base_weight):
        from serving.client.kserve import request_arrays
        from serving.core.regions import RegionLimits, parse_regions

        limits = RegionLimits(vae_factor=self.reference.vae_factor)
        items = [
            (
                s.base_prompt,
                parse_regions(
                    request_arrays(s.base_prompt, base_prompt_weight=base_weight, **s.request_fields()),
                    limits,
                    IMAGE_SIZE,
                    IMAGE_SIZE,
                ),
                seed,
            )
            for s, seed in zip(scenes, seeds)
        ]
        return np.concatenate(
            [
                self.reference.images(items[i : i + self.batch], guidance_scale, steps, mode)
                for i in range(0, len(items), self.batch)
            ]
        )

    def plain(self, prompts, seeds, guidance_scale, steps):
        return self.reference.plain_images(prompts, seeds, guidance_scale, steps)


class ServiceGenerator:
    """Through the running service, several requests at a time (the engine batches them)."""

    def __init__(self, url: str, protocol: str, concurrency: int = 8):
        self.url, self.protocol, self.concurrency = url, protocol, concurrency

    def _map(self, calls):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from serving.client.kserve import LdmClient

        local = threading.local()

        def run(call):
            if not hasattr(local, "client"):
                local.client = LdmClient(self.url, protocol=self.protocol)
            return call(local.client)

        with ThreadPoolExecutor(self.concurrency) as pool:
            return np.stack(list(pool.map(run, calls)))

    def regional(self, scenes, seeds, mode, guidance_scale, steps, base_weight):
        common = dict(
            steps=steps,
            guidance_scale=guidance_scale,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            region_mode=mode,
            base_prompt_weight=base_weight,
        )
        return self._map(
            [
                lambda c, s=s, seed=seed: c.generate(s.base_prompt, seed=int(seed), **common, **s.request_fields())
                for s, seed in zip(scenes, seeds)
            ]
        )

    def plain(self, prompts, seeds, guidance_scale, steps):
        common = dict(steps=steps, guidance_scale=guidance_scale, height=IMAGE_SIZE, width=IMAGE_SIZE)
        return self._map(
            [lambda c, p=p, seed=seed: c.generate(p, seed=int(seed), **common) for p, seed in zip(prompts, seeds)]
        )
