"""The evaluator that reads generated images: right on ground truth, and it can say no."""
import dataclasses

import numpy as np

from training.data import BACKGROUND_COLOURS, eval_scenes, render
from training.evaluate import check, read_image, score


def test_ground_truth_renders_are_read_correctly():
    scenes = eval_scenes(150, held_out=False, seed=11) + eval_scenes(150, held_out=True, seed=11)
    result = score(scenes, [render(s) for s in scenes])
    assert result["prompt_accuracy"] >= 0.98


def test_wrong_images_fail_the_right_attributes():
    one = next(s for s in eval_scenes(20, held_out=False) if len(s.objects) == 1)
    image = render(one)
    other_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}[one.objects[0].shape]
    wrong = dataclasses.replace(one, objects=(dataclasses.replace(one.objects[0], shape=other_shape),))
    result = check(wrong, image)
    assert not result["shape"] and result["colour"] and result["background"]

    blank = np.empty((64, 64, 3), np.uint8)
    blank[:] = BACKGROUND_COLOURS[one.background]
    result = check(one, blank)
    assert result["background"] and not result["count"] and not result["colour"]


def test_two_object_relation_is_read_from_the_image():
    two = next(s for s in eval_scenes(20, held_out=False) if len(s.objects) == 2)
    flipped = dataclasses.replace(two, objects=two.objects[::-1])  # same caption words, swapped roles
    assert all(check(two, render(two)).values())
    assert not check(flipped, render(two))["relation"]


def test_noise_is_not_an_object():
    rng = np.random.default_rng(0)
    background, objects = read_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert objects == []
