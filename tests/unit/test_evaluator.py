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


def test_mcnemar_exact_p_values():
    from training.eval_suite import mcnemar_p

    assert mcnemar_p(7, 0) == 2 / 2**7
    assert mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert abs(mcnemar_p(2, 10) - mcnemar_p(10, 2)) < 1e-15 and mcnemar_p(10, 2) < 0.05 < mcnemar_p(8, 3)


def test_guidance_target_needs_a_significant_paired_win_on_both_sets():
    from training.eval_suite import targets

    def result(passes):
        return {"prompt_accuracy": sum(passes) / len(passes), "passed": passes}

    g1 = [True] * 90 + [False] * 10
    better = [True] * 98 + [False] * 2  # 8 more pass, none fewer: p = 2 / 2**8
    results = {
        ("seen", 1.0): result(g1),
        ("held-out", 1.0): result(g1),
        ("seen", 5.0): result(better),
        ("held-out", 5.0): result(better),
    }
    assert targets(results)[2].passed
    results[("held-out", 5.0)] = result(g1)
    assert not targets(results)[2].passed
