"""The evaluator of regional layouts: right on ground-truth renders, and it says no to objects in
the wrong region, missing objects, and another region's object."""

import dataclasses

import numpy as np
import pytest

from training.data import BACKGROUND_COLOURS, render
from training.regional_eval import LAYOUTS, check_regions, evaluator_accuracy, region_scenes


def test_ground_truth_renders_of_every_layout_are_read_correctly():
    assert evaluator_accuracy(count=40) >= 0.98


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_scenes_put_each_prompted_position_inside_its_region(layout):
    masks = layout.masks()
    assert masks.shape == (layout.count, 64, 64) and masks.dtype == np.uint8 and (masks.max(axis=(1, 2)) == 255).all()
    for scene in region_scenes(layout, 20):
        assert len(scene.region_prompts) == layout.count and len({o.colour for o in scene.objects}) == layout.count
        for r, (obj, prompt) in enumerate(zip(scene.objects, scene.region_prompts)):
            assert obj.colour in prompt and obj.shape in prompt and scene.background in prompt
            assert masks[r, int(obj.cy), int(obj.cx)] == 255  # the ground truth puts it inside its region
        assert scene.objects[layout.base_pair[0]].colour in scene.base_prompt.split(" ")[1]


def test_wrong_images_fail_the_right_regions():
    layout = next(layout for layout in LAYOUTS if layout.name == "halves")
    scene = region_scenes(layout, 1)[0]
    assert check_regions(scene, render(scene.scene))["whole"]

    swapped = dataclasses.replace(
        scene, objects=tuple(dataclasses.replace(o, cx=64 - o.cx) for o in scene.objects)
    )  # each object in the other half
    result = check_regions(scene, render(swapped.scene))
    assert [r["passed"] for r in result["regions"]] == [False, False]
    assert [r["clean"] for r in result["regions"]] == [False, False] and not result["whole"]

    one = dataclasses.replace(scene, objects=scene.objects[:1])  # the right half left empty
    result = check_regions(scene, render(one.scene))
    assert [r["passed"] for r in result["regions"]] == [True, False] and not result["regions"][1]["colour"]

    other_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}
    wrong = dataclasses.replace(
        scene,
        objects=(dataclasses.replace(scene.objects[0], shape=other_shape[scene.objects[0].shape]), scene.objects[1]),
    )
    result = check_regions(scene, render(wrong.scene))
    assert result["regions"][0] == {"colour": True, "shape": False, "clean": True, "passed": False}

    blank = np.empty((64, 64, 3), np.uint8)
    blank[:] = BACKGROUND_COLOURS[scene.background]
    assert not any(r["passed"] for r in check_regions(scene, blank)["regions"])
