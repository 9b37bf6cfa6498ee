"""The shapes world: pure rendering, the held-out split, captions and prompt sets."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipvqd.shapes.captions import caption, describe, parse_prompt
from clipvqd.shapes.dataset import ShapesImages, item_seed, write_pngs
from clipvqd.shapes.prompts import heldout_prompts, in_distribution_prompts, write_prompt_files
from clipvqd.shapes.world import (
    ATTRIBUTE_NAMES,
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
    Attributes,
    Jitter,
    all_attributes,
    random_attributes,
    random_jitter,
    render,
)


def test_vocabularies_meet_the_spec():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6 and len(BACKGROUNDS) >= 3
    assert set(SIZES) == {"small", "large"} and len(POSITIONS) >= 5
    assert not set(COLOURS) & set(BACKGROUNDS)  # a background can never equal the shape colour
    assert len(HELDOUT_PAIRS) >= 3
    assert all(s in SHAPES and c in COLOURS for s, c in HELDOUT_PAIRS)
    with pytest.raises(ValueError):
        Attributes("hexagon", "red", "gray", "small", "left")


def test_render_is_pure_and_antialiased():
    attrs = Attributes("star", "red", "gray", "large", "left")
    jitter = Jitter(dx=0.01, dy=-0.015, scale=1.04, angle=7.0)
    a, b = render(attrs, 64, jitter), render(attrs, 64, jitter)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(attrs, 64, Jitter()))
    colours = {tuple(p) for p in a.reshape(-1, 3)}
    assert COLOURS["red"] in colours and BACKGROUNDS["gray"] in colours
    assert len(colours) > 10  # edge pixels blend the two colours


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_stay_inside_the_image(size):
    # At the most extreme jitter a corner of a large shape near an edge may touch
    # the border pixels; the border stays (almost all) pure background.
    for attrs in all_attributes():
        for sign in (-1, 1):
            jitter = Jitter(dx=sign * 0.02, dy=sign * 0.02, scale=1.06, angle=0.0)
            image = render(attrs, size, jitter)
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            background = (border == BACKGROUNDS[attrs.background]).all(axis=1)
            assert background.mean() >= 0.98, attrs
            if attrs.size == "small" or attrs.position == "center":
                assert background.all(), attrs


def test_random_functions_follow_their_generator():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [(random_attributes(g, True), random_jitter(g)) for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_random_attributes_respects_heldout_ok():
    g = torch.Generator().manual_seed(0)
    with_heldout = {(a.shape, a.colour) for a in (random_attributes(g, True) for _ in range(2000))}
    without = {(a.shape, a.colour) for a in (random_attributes(g, False) for _ in range(2000))}
    assert set(HELDOUT_PAIRS) <= with_heldout
    assert not set(HELDOUT_PAIRS) & without
    assert len(without) == len(SHAPES) * len(COLOURS) - len(HELDOUT_PAIRS)


def test_dataset_is_pure_per_index_and_never_shows_heldout_pairs():
    data = ShapesImages(seed=5, count=3000, image_size=32)
    again = ShapesImages(seed=5, count=3000, image_size=32)
    other = ShapesImages(seed=6, count=3000, image_size=32)
    x = data[17]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, again[17]) and torch.equal(data[2999], again[2999])
    assert not torch.equal(data[17], other[17])
    attrs = [data.attributes(i) for i in range(len(data))]
    assert not any(a.is_heldout for a in attrs)
    pairs = {(a.shape, a.colour) for a in attrs}
    assert len(pairs) == len(SHAPES) * len(COLOURS) - len(HELDOUT_PAIRS)
    for name in ATTRIBUTE_NAMES:
        assert {getattr(a, name) for a in attrs} == set(VOCABULARY[name])
    # the jitter makes images distinct: far more than the 720 attribute combinations
    images = {data.image(i).tobytes() for i in range(1500)}
    assert len(images) > 1400
    with pytest.raises(IndexError):
        data[3000]


def test_item_seeds_do_not_collide():
    seeds = {item_seed(s, i) for s in range(20) for i in range(2000)}
    assert len(seeds) == 20 * 2000


def test_write_pngs_round_trips(tmp_path):
    data = ShapesImages(seed=1, count=3, image_size=32)
    paths = write_pngs(data, tmp_path)
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]
    for i, path in enumerate(paths):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), data.image(i))


def test_captions_use_synonyms_leave_attributes_out_and_parse_back():
    g = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(1500):
        attrs = random_attributes(g, True)
        text = caption(attrs, g)
        parsed = parse_prompt(text)
        assert parsed, text
        assert all(parsed[k] == getattr(attrs, k) for k in parsed), (text, parsed, attrs)
        texts.append((text, len(parsed)))
    joined = " ".join(t for t, _ in texts)
    for word in ("disk", "box", "big", "little", "violet", "grey", "in the middle", "a picture of"):
        assert word in joined
    counts = {n for _, n in texts}
    assert {1, 5} <= counts  # some captions name one attribute, some all five


def test_describe_names_exactly_the_given_attributes():
    g = torch.Generator().manual_seed(1)
    for i in range(2000):
        attrs = random_attributes(g, True).as_dict()
        mask = int(torch.randint(1, 32, (1,), generator=g))
        named = {k: v for j, (k, v) in enumerate(attrs.items()) if mask >> j & 1}
        text = describe(named, g if i % 2 else None)
        assert parse_prompt(text) == named, text
    assert describe({"size": "small", "colour": "red", "shape": "circle"}) == "a small red circle"
    assert parse_prompt("A picture of a red round shape") == {"colour": "red", "shape": "circle"}
    assert parse_prompt("a small red disk at the top on a gray background") == {
        "shape": "circle", "colour": "red", "background": "gray", "size": "small", "position": "top"}
    assert parse_prompt("an orange star shape, left, against grey") == {
        "shape": "star", "colour": "orange", "background": "gray", "position": "left"}
    assert parse_prompt("a cat") == {}


def test_prompt_sets_split_and_parse(tmp_path):
    ind, held = in_distribution_prompts(), heldout_prompts()
    assert ind == in_distribution_prompts()  # fixed
    assert len(ind) >= 40 and len(held) >= 3 * len(HELDOUT_PAIRS)
    for prompts, heldout in ((ind, False), (held, True)):
        for text, named in prompts:
            assert len(named) >= 2 and parse_prompt(text) == named
            assert ((named["shape"], named["colour"]) in HELDOUT_PAIRS) == heldout
    assert {(n["shape"], n["colour"]) for _, n in held} == set(HELDOUT_PAIRS)
    paths = write_prompt_files(tmp_path / "prompts")
    assert paths["in_distribution"].read_text().splitlines() == [t for t, _ in ind]
    assert paths["heldout"].read_text().splitlines() == [t for t, _ in held]
