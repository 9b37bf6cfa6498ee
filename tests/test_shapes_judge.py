"""The judge reads clean renders back exactly, and scores sets of images."""

import itertools

import numpy as np
import pytest
import torch

from clipvqd.shapes.judge import correctness, judge, score, unit_area
from clipvqd.shapes.world import (
    BACKGROUNDS,
    Attributes,
    Jitter,
    all_attributes,
    random_attributes,
    random_jitter,
    render,
    to_tensor,
)


@pytest.mark.parametrize("size", [64, 32])
def test_judge_is_right_on_2000_random_clean_renders(size):
    g = torch.Generator().manual_seed(100 + size)
    wrong = []
    for _ in range(2000):
        attrs = random_attributes(g, heldout_ok=True)
        got = judge(render(attrs, size, random_jitter(g)))
        if got != attrs.as_dict():
            wrong.append((attrs, got))
    assert wrong == []


def test_judge_is_right_at_extreme_jitter():
    # every combination, at the corners of the jitter box (32 px: the hardest size)
    corners = [Jitter(dx, dy, s, a) for dx, dy, s, a in
               itertools.product((-0.02, 0.02), (-0.02, 0.02), (0.94, 1.06), (-12.0, 12.0))]
    g = torch.Generator().manual_seed(0)
    for attrs in all_attributes():
        jitter = corners[int(torch.randint(len(corners), (1,), generator=g))]
        assert judge(render(attrs, 32, jitter)) == attrs.as_dict(), (attrs, jitter)


def test_judge_accepts_float_tensors_and_blank_images():
    attrs = Attributes("triangle", "orange", "black", "large", "right")
    image = render(attrs, 64, Jitter(angle=5.0))
    assert judge(to_tensor(image)) == attrs.as_dict()
    blank = np.full((32, 32, 3), BACKGROUNDS["white"], dtype=np.uint8)
    assert judge(blank) == {"shape": None, "colour": None, "background": "white", "size": None, "position": None}
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # 0-255 floats would be read as near-white
        judge(image.astype(np.float32))


def test_unit_areas_are_exact():
    assert unit_area("circle") == pytest.approx(np.pi)
    assert unit_area("square") == pytest.approx(2.0)
    assert unit_area("triangle") == pytest.approx(3 * np.sqrt(3) / 4)
    assert unit_area("star") == pytest.approx(5 * 0.5 * np.sin(np.radians(36)))


def test_score_counts_each_named_attribute_and_all():
    red = Attributes("circle", "red", "gray", "small", "left")
    images = [render(red, 32, Jitter()),
              render(Attributes("circle", "blue", "gray", "small", "left"), 32, Jitter()),
              render(Attributes("square", "red", "gray", "small", "top"), 32, Jitter()),
              render(Attributes("circle", "red", "white", "large", "left"), 32, Jitter())]
    named = {"shape": "circle", "colour": "red", "position": "left"}
    assert score(images, named) == {"shape": 0.75, "colour": 0.75, "position": 0.75, "all": 0.5}
    flags = correctness(images, named)
    assert flags["all"].tolist() == [True, False, False, True]
    assert score(images, {"background": "gray", "size": "small"}) == {"background": 0.75, "size": 0.75, "all": 0.75}
