"""The captioned-shapes world: seeded scene sampling, rendering and the caption grammar.

A scene is one object (size, colour, shape, position in the frame) or two objects (colour and
shape each, one spatial relation between them), on a flat background colour. Colours sit far
apart in RGB so an evaluator can segment images by nearest palette colour; edges are
anti-aliased (4x supersampling) so the autoencoder is not asked to reproduce aliasing.

Some colour-shape combinations are held out: training scenes never contain them, anywhere, so
the evaluation can measure compositional generalisation on them.
"""

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4

OBJECT_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 225),
    "yellow": (235, 215, 30),
    "cyan": (30, 205, 215),
    "magenta": (205, 40, 205),
}
BACKGROUND_COLOURS = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "grey": (125, 125, 125),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6.0, "large": 12.0}  # half-extent in pixels
SIZE_JITTER = 1.0
POSITIONS = {  # name -> (phrase, centre x, centre y)
    "left": ("on the left of", 16, 32),
    "right": ("on the right of", 48, 32),
    "top": ("at the top of", 32, 16),
    "bottom": ("at the bottom of", 32, 48),
    "centre": ("in the centre of", 32, 32),
}
POSITION_JITTER = 3
RELATIONS = {  # name -> (phrase, offset of the first object from the second, in pixels)
    "above": ("above", (0, -24)),
    "below": ("below", (0, 24)),
    "left of": ("to the left of", (-24, 0)),
    "right of": ("to the right of", (24, 0)),
}
PAIR_HALF_EXTENT = 6.0  # objects in two-object scenes are small; their captions name no size
PAIR_JITTER = 3
TWO_OBJECT_FRACTION = 0.4

# Never rendered during training. Each colour and each shape still appears in other combos.
HELD_OUT_COMBOS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float
    cy: float
    half: float  # half-extent: radius, half side, or half base/height of the triangle


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple  # of Obj; one or two
    size: str | None = None  # one-object scenes
    position: str | None = None  # one-object scenes
    relation: str | None = None  # two-object scenes: objects[0] <relation> objects[1]

    @property
    def caption(self) -> str:
        bg = f"a {self.background} background"
        first = self.objects[0]
        if len(self.objects) == 1:
            assert self.position is not None  # one-object scenes have one
            return f"a {self.size} {first.colour} {first.shape} {POSITIONS[self.position][0]} {bg}"
        second = self.objects[1]
        assert self.relation is not None  # two-object scenes have one
        relation = RELATIONS[self.relation][0]
        return f"a {first.colour} {first.shape} {relation} a {second.colour} {second.shape} on {bg}"

    @property
    def combos(self):
        return {(o.colour, o.shape) for o in self.objects}


def vocabulary():
    """Every word the grammar can produce."""
    words = {"a", "on", "background"}
    words |= set(OBJECT_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPES) | set(SIZES)
    for phrase, *_ in list(POSITIONS.values()) + list(RELATIONS.values()):
        words |= set(phrase.split())
    return sorted(words)


def _combo(rng, held_out: bool | None):
    """A (colour, shape) pair; held_out=None means any seen combo, True forces a held-out one."""
    if held_out:
        combos = sorted(HELD_OUT_COMBOS)
    else:
        combos = [(c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in HELD_OUT_COMBOS]
    return combos[rng.integers(len(combos))]


def sample_scene(rng: np.random.Generator, two_objects: bool | None = None, held_out: bool = False) -> Scene:
    """A random scene. held_out=False: only seen combos (training and the 'seen' eval set);
    held_out=True: the (first) object is a held-out combo, any second one is seen."""
    if two_objects is None:
        two_objects = rng.random() < TWO_OBJECT_FRACTION
    background = sorted(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    if not two_objects:
        colour, shape = _combo(rng, held_out)
        size = sorted(SIZES)[rng.integers(len(SIZES))]
        position = sorted(POSITIONS)[rng.integers(len(POSITIONS))]
        _, x, y = POSITIONS[position]
        jx, jy = rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, size=2)
        half = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        obj = Obj(colour, shape, float(x + jx), float(y + jy), float(half))
        return Scene(background, (obj,), size=size, position=position)
    first = _combo(rng, held_out)
    second = _combo(rng, False)
    while second[0] == first[0]:  # same-coloured neighbours would merge in the evaluator
        second = _combo(rng, False)
    if held_out and rng.random() < 0.5:  # the held-out object may come first or second
        first, second = second, first
    relation = sorted(RELATIONS)[rng.integers(len(RELATIONS))]
    dx, dy = RELATIONS[relation][1]
    mx, my = 32 + rng.integers(-PAIR_JITTER, PAIR_JITTER + 1, size=2)
    objs = []
    for (colour, shape), sign in ((first, 0.5), (second, -0.5)):
        jx, jy = rng.integers(-PAIR_JITTER, PAIR_JITTER + 1, size=2)
        half = PAIR_HALF_EXTENT + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        objs.append(Obj(colour, shape, float(mx + sign * dx + jx), float(my + sign * dy + jy), float(half)))
    return Scene(background, tuple(objs), relation=relation)


_FINE = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres


def _mask(obj: Obj, x_scale: float = 1.0, y_scale: float = 1.0) -> np.ndarray:
    """Coverage of `obj` per pixel, in [0, 1]. The scales stretch it about its centre (the LoRA
    adapters' styles); the base model's data always uses 1."""
    x = _FINE[None, :] - obj.cx
    if x_scale != 1.0:
        x = x / x_scale
    y = _FINE[:, None] - obj.cy
    if y_scale != 1.0:
        y = y / y_scale
    h = obj.half
    if obj.shape == "circle":
        fine = x * x + y * y <= h * h
    elif obj.shape == "square":
        fine = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif obj.shape == "bar":  # concept shapes of the LoRA adapters, never in the base model's data
        fine = (np.abs(x) <= h * BAR_LENGTH) & (np.abs(y) <= h * BAR_THICKNESS)
    elif obj.shape == "ring":
        outer = h + RING_EXTRA
        fine = (x * x + y * y <= outer * outer) & (x * x + y * y >= (RING_INNER * outer) ** 2)
    else:  # isosceles triangle pointing up, base 2h, height 2h, centred on its bounding box
        fine = (y <= h) & (y >= -h) & (np.abs(x) <= (y + h) / 2)
    s = SUPERSAMPLE
    return fine.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3))


def render(scene: Scene, style: str | None = None) -> np.ndarray:
    """uint8 [64, 64, 3]. `style` (a name in STYLES) is for the LoRA adapters' training data only."""
    scales = STYLES[style] if style is not None else (1.0, 1.0)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    image[:] = BACKGROUND_COLOURS[scene.background]
    for obj in scene.objects:
        cover = _mask(obj, *scales)[..., None]
        image = image * (1 - cover) + np.asarray(OBJECT_COLOURS[obj.colour], np.float32) * cover
    return np.round(image).astype(np.uint8)


def training_batch(rng: np.random.Generator, batch_size: int):
    """Fresh seen-combo scenes: (uint8 images [B, 64, 64, 3], captions)."""
    scenes = [sample_scene(rng) for _ in range(batch_size)]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes]


def eval_scenes(count: int, held_out: bool, seed: int = 1234):
    """The fixed evaluation prompt set: `count` scenes, the same for every run and checkpoint."""
    rng = np.random.default_rng([seed, int(held_out)])
    return [sample_scene(rng, two_objects=i % 5 >= 3, held_out=held_out) for i in range(count)]


# --- LoRA adapters' worlds (training/lora_train.py) -------------------------------------------
# Additions only: the base model's scene sampling, captions, seeds and renders above are
# byte-identical with or without them (tests/engine/test_lora_train.py hashes them). Nothing here is in
# SHAPES, vocabulary() or HELD_OUT_COMBOS.

# Shapes the base model never saw. Neither word is in the shipped tokenizer's vocabulary: each
# tokenizes to <unk> (as does any unknown word), which is why a concept adapter trains a
# text-encoder part too (docs/loras.md).
CONCEPT_SHAPES = ("bar", "ring")
BAR_LENGTH, BAR_THICKNESS = 1.2, 0.5  # a bar's half-width and half-height, in half-extents
RING_EXTRA = 1.0  # a ring's outer radius is the object's half-extent plus this (pixels)
RING_INNER = 0.5  # inner radius / outer radius: a small ring's hole is ~7 px, which the VAE keeps
# Concept colours never rendered while training a concept adapter: its held-out prompts.
CONCEPT_HELD_OUT = frozenset({("blue", "bar"), ("yellow", "bar"), ("blue", "ring"), ("yellow", "ring")})
# Styles: name -> (horizontal, vertical) scale of every shape about its centre (same colours,
# same centres). "tall": 1.25 times taller, as wide (a large object near the top or bottom edge
# loses up to ~3 px to the frame).
STYLES = {"tall": (1.0, 1.25)}


def sample_concept_scene(
    rng: np.random.Generator, concept: str = "ring", two_objects: bool | None = None, held_out: bool = False
) -> Scene:
    """A scene of the same grammar with `concept` as one object's shape: alone (size, position)
    or next to a seen colour-shape combination (relation; the concept first or second).
    held_out=True: the concept's colour is one of CONCEPT_HELD_OUT's, else one of the others."""
    if two_objects is None:
        two_objects = rng.random() < TWO_OBJECT_FRACTION
    background = sorted(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    held = sorted(c for c, s in CONCEPT_HELD_OUT if s == concept)
    colours = held if held_out else [c for c in OBJECT_COLOURS if c not in held]
    colour = colours[rng.integers(len(colours))]
    if not two_objects:
        size = sorted(SIZES)[rng.integers(len(SIZES))]
        position = sorted(POSITIONS)[rng.integers(len(POSITIONS))]
        _, x, y = POSITIONS[position]
        jx, jy = rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, size=2)
        half = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        return Scene(
            background, (Obj(colour, concept, float(x + jx), float(y + jy), float(half)),), size=size, position=position
        )
    first = (colour, concept)
    second = _combo(rng, False)
    while second[0] == first[0]:
        second = _combo(rng, False)
    if rng.random() < 0.5:
        first, second = second, first
    relation = sorted(RELATIONS)[rng.integers(len(RELATIONS))]
    dx, dy = RELATIONS[relation][1]
    mx, my = 32 + rng.integers(-PAIR_JITTER, PAIR_JITTER + 1, size=2)
    objs = []
    for (c, shape), sign in ((first, 0.5), (second, -0.5)):
        jx, jy = rng.integers(-PAIR_JITTER, PAIR_JITTER + 1, size=2)
        half = PAIR_HALF_EXTENT + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        objs.append(Obj(c, shape, float(mx + sign * dx + jx), float(my + sign * dy + jy), float(half)))
    return Scene(background, tuple(objs), relation=relation)


def concept_eval_scenes(count: int, held_out: bool, concept: str = "ring", seed: int = 4321):
    """The concept adapter's fixed prompt sets (40% two-object, as eval_scenes)."""
    rng = np.random.default_rng([seed, int(held_out)])
    return [sample_concept_scene(rng, concept, two_objects=i % 5 >= 3, held_out=held_out) for i in range(count)]
