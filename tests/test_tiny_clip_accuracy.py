"""The shipped tiny CLIP really understands the shapes world (zero-shot, fresh clean renders).

The issue's targets on 1,000 renders are colour, shape, background >= 95% and
size, position >= 90%; here 400 fresh renders (a seed the trainer never used)
must reach those targets minus a 3-point margin for sampling noise.
"""

import pytest

from clipvqd.clip import load_clip
from clipvqd.shapes.clip_checks import fresh_renders, zero_shot_accuracy, zero_shot_prompts

TARGETS = {"colour": 0.95, "shape": 0.95, "background": 0.95, "size": 0.90, "position": 0.90}
MARGIN = 0.03


@pytest.fixture(scope="module")
def clip():
    return load_clip("shapes")


@pytest.mark.parametrize("image_size", [64, 32])
def test_zero_shot_accuracy_meets_the_targets(clip, image_size):
    images, attrs = fresh_renders(seed=777 + image_size, count=400, image_size=image_size)
    accuracy = zero_shot_accuracy(clip, images, attrs)
    for attribute, target in TARGETS.items():
        assert accuracy[attribute] >= target - MARGIN, accuracy


def test_zero_shot_prompts_name_one_attribute():
    assert zero_shot_prompts("colour")[:2] == ["a red shape", "a green shape"]
    assert zero_shot_prompts("shape")[0] == "a circle"
    assert zero_shot_prompts("background")[0] == "a shape on a white background"
    assert zero_shot_prompts("position")[0] == "a shape in the center"
