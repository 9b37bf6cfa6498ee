"""Image sources: a messy folder (bad files skipped, one warning), exact pixel
conversions (EXIF, 16-bit, transparency), the HF source offline, and the
uint8 / PNG / grid edges."""

import logging
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from clipvqd.data import (
    from_uint8,
    load_image_file,
    make_grid,
    open_images,
    resize_center_crop,
    save_png,
    to_uint8,
)
from clipvqd.errors import UserError


def folder(path, image_size=16):
    return SimpleNamespace(source="folder", path=str(path), image_size=image_size)


def only_image(path, image_size):
    """Pixels (uint8 HWC) of the single image in a folder source."""
    dataset = open_images(folder(path, image_size))
    assert len(dataset) == 1
    return to_uint8(dataset[0])


def noise(rng, width, height, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


def png_header_only(path, width, height):
    """A PNG that declares width x height pixels but holds no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


VALID = [
    "cmyk.jpg", "deep16.png", "gray.png", "gray_alpha.png", "nested/deeper/rgba.png",
    "odd.png/inside.jpg", "one_bit.bmp", "palette_alpha.png", "photo.webp", "pixel.png",
    "rgb.jpg", "upper.PNG",
]
BAD = ["big.png", "broken.png", "empty.png", "locked.png", "loop.png", "notes.jpg", "truncated.jpg"]


@pytest.fixture
def messy(tmp_path, monkeypatch):
    """A folder with valid images in many modes and every kind of bad file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "odd.png").mkdir()  # a directory with an image name: walked into, not read
    noise(rng, 40, 30).save(root / "rgb.jpg", quality=95)
    noise(rng, 30, 40, "L").save(root / "gray.png")
    noise(rng, 20, 20, "LA").save(root / "gray_alpha.png")
    noise(rng, 25, 25).convert("1").save(root / "one_bit.bmp")
    noise(rng, 20, 20).save(root / "upper.PNG")
    noise(rng, 20, 20).save(root / "photo.webp")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "pixel.png")
    noise(rng, 24, 24, "RGBA").save(root / "nested" / "deeper" / "rgba.png")
    noise(rng, 24, 24).quantize(8).save(root / "palette_alpha.png", transparency=0)
    Image.new("CMYK", (20, 20), (10, 200, 30, 0)).save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (20, 20), dtype=np.uint16)).save(root / "deep16.png")
    noise(rng, 12, 12).save(root / "odd.png" / "inside.jpg")
    noise(rng, 12, 12).save(root / "locked.png")
    # Bad files.
    (root / "empty.png").write_bytes(b"")
    jpeg = root / "full.tmp"
    noise(rng, 64, 64).save(jpeg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    jpeg.unlink()
    (root / "notes.jpg").write_text("this is not a picture\n")
    png_header_only(root / "big.png", 30000, 30000)  # 9e8 pixels: over PIL's bomb limit
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "broken.png").symlink_to(root / "missing-target.png")
    (root / "nested" / "back").symlink_to(root)  # a folder loop: must not hang or duplicate
    (root / "readme.txt").write_text("not an image extension: ignored silently")

    # Tests run as root, where chmod 000 does not stop reading: simulate it.
    real_open = PIL.Image.open

    def guarded_open(fp, *args, **kwargs):
        if isinstance(fp, (str, Path)) and Path(fp).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", guarded_open)
    return root


def test_messy_folder_uses_exactly_the_valid_images(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="clipvqd"):
        dataset = open_images(folder(messy, image_size=16))
    used = [p.relative_to(messy).as_posix() for p in dataset.files]
    assert used == sorted(VALID, key=str)
    assert len(dataset) == len(VALID)
    assert sorted(name for name, _ in dataset.skipped) == BAD
    reasons = dict(dataset.skipped)
    assert "DecompressionBomb" in reasons["big.png"]
    assert "PermissionError" in reasons["locked.png"]

    warnings = [r for r in caplog.records if r.name == "clipvqd" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"skipped {len(BAD)} of {len(VALID) + len(BAD)} images" in message
    assert "big.png" in message and "and 2 more" in message  # names the first 5 of 7

    batch = torch.stack([dataset[i] for i in range(len(dataset))])
    assert batch.shape == (len(VALID), 3, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert batch.std() > 0.1  # real content, not a constant fill


def test_folder_order_is_deterministic(messy):
    first = open_images(folder(messy)).files
    second = open_images(folder(messy)).files
    assert first == second


def test_symlinked_folders_are_followed_once(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(outside / "a.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside)
    (root / "linked_again").symlink_to(outside)  # same folder twice: read once
    dataset = open_images(folder(root, image_size=8))
    assert [p.relative_to(root).as_posix() for p in dataset.files] == ["linked/a.png"]


def test_all_bad_folder_is_a_user_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("nope")
    with pytest.raises(UserError, match=str(tmp_path)):
        open_images(folder(tmp_path))


def test_empty_and_missing_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no readable image"):
        open_images(folder(tmp_path))
    with pytest.raises(UserError, match="not found"):
        open_images(folder(tmp_path / "nowhere"))


def test_config_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data.source"):
        open_images(SimpleNamespace(source="ftp", path=str(tmp_path), image_size=16))
    with pytest.raises(UserError, match="image_size"):
        open_images(SimpleNamespace(source="folder", path=str(tmp_path), image_size=0))
    with pytest.raises(UserError, match="data.path"):
        open_images(SimpleNamespace(source="folder", path="", image_size=16))


def test_exif_orientation_is_applied(tmp_path):
    # Stored 16 wide x 8 tall: top half red, bottom half blue. Orientation 6
    # means "rotate 90 degrees clockwise to display": upright it is 8 x 16 with
    # red on the right and blue on the left.
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:4, :, 0] = 255
    pixels[4:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", quality=100, exif=exif)
    out = only_image(tmp_path, image_size=8).astype(int)
    left, right = out[:, :3], out[:, 5:]
    assert (left[..., 2] > 200).all() and (left[..., 0] < 60).all()
    assert (right[..., 0] > 200).all() and (right[..., 2] < 60).all()


def test_sixteen_bit_png_scales_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 1000, 25700], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    values = np.tile(values, (2, 1))  # 4 x 4
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = only_image(tmp_path, image_size=4)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert expected[0].tolist() == [0, 1, 4, 100] and expected[1].tolist() == [128, 156, 254, 255]
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)


def test_palette_transparency_composites_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, 1 green
    for x in range(2, 4):
        for y in range(4):
            image.putpixel((x, y), 1)
    image.save(tmp_path / "palette.png", transparency=0)  # red is fully transparent
    out = only_image(tmp_path, image_size=4)
    assert (out[:, :2] == 255).all()  # transparent -> white, not red or black
    assert (out[:, 2:] == [0, 255, 0]).all()


def test_alpha_channels_composite_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(tmp_path / "half.png")
    out = only_image(tmp_path, image_size=4).astype(int)
    assert np.abs(out - 127).max() <= 1  # 255 * (1 - 128/255)
    (tmp_path / "half.png").unlink()
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "clear.png")
    assert (only_image(tmp_path, image_size=4) == 255).all()


def test_cmyk_and_grayscale_convert_to_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "white.jpg", quality=100)
    assert (only_image(tmp_path, image_size=4).astype(int) >= 254).all()
    (tmp_path / "white.jpg").unlink()
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    assert (only_image(tmp_path, image_size=4) == 77).all()


def test_one_pixel_image_is_kept_and_upscaled(tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 30)).save(tmp_path / "dot.png")
    out = only_image(tmp_path, image_size=8).astype(int)
    assert out.shape == (8, 8, 3)
    assert np.abs(out - [200, 10, 30]).max() <= 1


def test_resize_short_side_then_centre_crop():
    # 60 x 20: red | green | blue thirds. Short side 20 -> 10 gives 30 x 10;
    # the centre 10 x 10 is the green third.
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :20, 0] = pixels[:, 20:40, 1] = pixels[:, 40:, 2] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(pixels), 10)).astype(int)
    assert out.shape == (10, 10, 3)
    centre = out[:, 2:8]
    assert (centre[..., 1] > 240).all() and (centre[..., [0, 2]] < 15).all()
    tall = np.asarray(resize_center_crop(Image.fromarray(pixels.transpose(1, 0, 2)), 10))
    assert tall.shape == (10, 10, 3) and (tall[2:8, :, 1] > 240).all()


def test_load_image_file(tmp_path):
    Image.new("RGB", (30, 20), (0, 255, 0)).save(tmp_path / "ref.png")
    image = load_image_file(tmp_path / "ref.png", 8)
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image[1], torch.ones(8, 8))
    torch.testing.assert_close(image[0], -torch.ones(8, 8))
    with pytest.raises(UserError, match="not found"):
        load_image_file(tmp_path / "missing.png", 8)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(UserError, match="text.png"):
        load_image_file(tmp_path / "text.png", 8)


# --- edges: uint8, PNG, grids -----------------------------------------------------


def test_uint8_round_trip_is_exact_and_clips():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 4, 64, 1).repeat(3, axis=-1)
    images = from_uint8(pixels)
    assert images.shape == (1, 3, 4, 64) and images.min() == -1 and images.max() == 1
    np.testing.assert_array_equal(to_uint8(images), pixels)
    np.testing.assert_array_equal(to_uint8(from_uint8(pixels[0])), pixels[0])  # unbatched
    assert to_uint8(torch.tensor([[[-5.0]], [[0.0]], [[7.0]]])).tolist() == [[[0, 128, 255]]]


def test_save_png_round_trip(tmp_path):
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_png(image, tmp_path / "sub" / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), to_uint8(image))
    pixels = np.full((3, 4, 3), 9, dtype=np.uint8)
    save_png(pixels, tmp_path / "y.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "y.png")), pixels)


def test_make_grid_layout():
    colours = np.arange(5, dtype=np.uint8) * 40  # image i is filled with 40 * i
    pixels = np.broadcast_to(colours[:, None, None, None], (5, 4, 3, 3)).copy()
    grid = make_grid(pixels, nrow=2, padding=1, pad_value=255)
    assert grid.shape == (3 * 5 + 1, 2 * 4 + 1, 3) and grid.dtype == np.uint8
    for i in range(5):
        row, col = divmod(i, 2)
        top, left = 1 + row * 5, 1 + col * 4
        assert (grid[top:top + 4, left:left + 3] == 40 * i).all()
    assert (grid[11:15, 5:8] == 255).all()  # the missing sixth tile
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()
    as_float = make_grid(from_uint8(pixels), nrow=2, padding=1)
    np.testing.assert_array_equal(as_float, grid)


# --- Hugging Face source (offline) ------------------------------------------------


def _hf_images(rng, count):
    return [noise(rng, 12 + i, 10, "RGB") for i in range(count)]


def test_hf_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
    table = datasets.Dataset.from_dict(
        {"picture": _hf_images(rng, 3), "label": [0, 1, 2]}, features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    config = SimpleNamespace(source="hf", path=str(tmp_path / "saved"), image_size=8,
                             hf_split="train", hf_image_column="picture")
    dataset = open_images(config)
    assert len(dataset) == 3
    first = dataset[0]
    assert first.shape == (3, 8, 8) and first.min() >= -1 and first.max() <= 1

    with pytest.raises(UserError, match="available columns: picture, label"):
        open_images(SimpleNamespace(source="hf", path=str(tmp_path / "saved"), image_size=8))

    datasets.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(
        str(tmp_path / "dict"))
    config.path, config.hf_split = str(tmp_path / "dict"), "validation"
    assert len(open_images(config)) == 1
    config.hf_split = "test"
    with pytest.raises(UserError, match="available splits: train, validation"):
        open_images(config)


def test_hf_bad_row_is_skipped_with_one_warning(tmp_path, caplog):
    import datasets

    good = tmp_path / "good.png"
    Image.new("RGB", (6, 6), (0, 0, 255)).save(good)
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": good.read_bytes(), "path": None},
                   {"bytes": b"not an image at all", "path": None}]},
        features=datasets.Features({"image": datasets.Image(decode=False)}))
    table.save_to_disk(str(tmp_path / "saved"))
    with caplog.at_level(logging.WARNING, logger="clipvqd"):
        dataset = open_images(SimpleNamespace(source="hf", path=str(tmp_path / "saved"), image_size=4))
    assert len(dataset) == 1 and [name for name, _ in dataset.skipped] == ["row 1"]
    assert (to_uint8(dataset[0]) == [0, 0, 255]).all()
    warnings = [r for r in caplog.records if r.name == "clipvqd"]
    assert len(warnings) == 1 and "skipped 1 of 2" in warnings[0].getMessage()


def test_hf_imagefolder_directory(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rng = np.random.default_rng(2)
    (tmp_path / "pictures").mkdir()
    for i, image in enumerate(_hf_images(rng, 4)):
        image.save(tmp_path / "pictures" / f"{i}.png")
    dataset = open_images(SimpleNamespace(source="hf", path=str(tmp_path / "pictures"), image_size=8))
    assert len(dataset) == 4 and dataset[3].shape == (3, 8, 8)


def test_hf_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_images(SimpleNamespace(source="hf", path=str(tmp_path / "nowhere"), image_size=8))


# --- shapes source ------------------------------------------------------------------


def test_shapes_source_is_the_shapes_world_dataset():
    from clipvqd.shapes.dataset import ShapesImages

    dataset = open_images(SimpleNamespace(source="shapes", path="", image_size=16, count=3, seed=7))
    assert isinstance(dataset, ShapesImages) and len(dataset) == 3
    image = dataset[2]
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    again = open_images(SimpleNamespace(source="shapes", path="", image_size=16, count=3, seed=7))
    torch.testing.assert_close(again[2], image)


def test_slugs_of_prompts_without_ascii_letters_differ():
    from clipvqd.project import slug

    assert slug("a red circle!") == "a-red-circle"
    assert slug("赤い円") != slug("青い四角") and slug("赤い円").startswith("p-")
    assert slug("赤い円") == slug("赤い円")  # deterministic
