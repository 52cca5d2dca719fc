"""The captioned-shapes generator: captions state what is rendered; held-out combos stay out."""

import numpy as np

from training.data import (
    BACKGROUND_COLOURS,
    HELD_OUT_COMBOS,
    OBJECT_COLOURS,
    POSITIONS,
    RELATIONS,
    eval_scenes,
    render,
    sample_scene,
    training_batch,
    vocabulary,
)
from training.tokenizer import build_word_tokenizer
from training.train import TEXT_MAX_LENGTH


def _scenes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_rendered_pixels_match_the_caption():
    for scene in _scenes():
        image = render(scene)
        words = scene.caption.split()
        assert f"{scene.background} background" in scene.caption
        assert tuple(image[0, 0]) == BACKGROUND_COLOURS[scene.background]
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in scene.caption
            # The bounding-box centre row of each shape is inside it (a triangle's too).
            assert tuple(image[int(obj.cy), int(obj.cx)]) == OBJECT_COLOURS[obj.colour], scene
        if len(scene.objects) == 1:
            assert words[1] == scene.size
            obj = scene.objects[0]
            _, x, y = POSITIONS[scene.position]
            assert abs(obj.cx - x) <= 3 and abs(obj.cy - y) <= 3
        else:
            first, second = scene.objects
            dx, dy = RELATIONS[scene.relation][1]
            assert RELATIONS[scene.relation][0] in scene.caption
            # the first object is displaced from the second in the stated direction
            assert (first.cx - second.cx) * np.sign(dx) + (first.cy - second.cy) * np.sign(dy) > 12


def test_objects_do_not_touch_and_stay_in_frame():
    for scene in _scenes():
        for o in scene.objects:
            assert o.half <= o.cx <= 64 - o.half and o.half <= o.cy <= 64 - o.half
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > a.half + b.half + 2
            assert a.colour != b.colour


def test_training_never_shows_a_held_out_combo():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(3000)]
    seen = set().union(*(s.combos for s in scenes))
    assert not seen & HELD_OUT_COMBOS
    assert len(seen) == len(OBJECT_COLOURS) * 3 - len(HELD_OUT_COMBOS)  # every other combo appears
    _, captions = training_batch(np.random.default_rng(2), 200)
    for colour, shape in HELD_OUT_COMBOS:
        assert not any(f"{colour} {shape}" in c for c in captions)


def test_held_out_eval_set_contains_a_held_out_combo_in_every_prompt():
    for scene in eval_scenes(100, held_out=True):
        assert scene.combos & HELD_OUT_COMBOS


def test_the_tokenizer_covers_every_caption_without_truncation():
    tokenizer = build_word_tokenizer(vocabulary(), TEXT_MAX_LENGTH)
    for scene in _scenes(200):
        ids = tokenizer(scene.caption).input_ids
        assert tokenizer.unk_token_id not in ids
        assert len(ids) <= TEXT_MAX_LENGTH
