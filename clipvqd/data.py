"""Image sources: a folder, a saved Hugging Face dataset, or the shapes world.

Every source is a ``torch.utils.data.Dataset`` whose items are float tensors
of shape (3, image_size, image_size) with values in [-1, 1], the library's one
image format. Conversion to and from 8-bit pixels happens only at the edges
(``to_uint8``, ``from_uint8``, ``save_png``, ``make_grid``).

Robustness, because real folders are messy: when a folder or HF source is
opened, every image is decoded once. Files that cannot be read as an image
(empty, truncated, not an image at all, over PIL's decompression-bomb limit,
a symlink loop, a broken link, no permission) are left out and reported in ONE
warning on the ``clipvqd`` logger; a source with no usable image at all is a
``UserError``. A valid but tiny image (even 1x1) is kept and upscaled: it is
a real image, and the warning is for files we could not read. "Over the
decompression-bomb limit" means PIL refuses it (more than 2 x
``Image.MAX_IMAGE_PIXELS`` pixels); images between 1x and 2x that limit are
read, with PIL's own DecompressionBombWarning.

How every image becomes RGB (``decode_rgb``):
- EXIF orientation is applied first (``ImageOps.exif_transpose``), so photos
  taken with a rotated camera come out upright.
- Transparency (RGBA, LA, PA, premultiplied RGBa, a palette with a
  transparent entry) is composited on white.
- 16-bit grayscale (modes I;16*, and I, which is how PNG's 16-bit gray can
  arrive) is scaled to 8 bits as round(v * 255 / 65535); PIL's own convert
  would clip every value above 255 to white. 16-bit colour PNGs are already
  reduced to 8 bits by PIL when it opens them (it keeps the high byte).
- Everything else (L, 1, P, CMYK, YCbCr, ...) uses PIL's convert("RGB").

Then the short side is resized to image_size (bicubic; PIL widens the filter
when shrinking, so this is antialiased) and the centre is cropped square.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from clipvqd.errors import UserError

log = logging.getLogger("clipvqd")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SOURCES = ("folder", "hf", "shapes")
_NAMED_IN_WARNING = 5  # how many skipped files the warning names


# ----------------------------------------------------------------------------
# Decoding one image
# ----------------------------------------------------------------------------


def _white_composite(image: Image.Image) -> Image.Image:
    """Flatten an image with an alpha channel onto a white background."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_gray_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit gray (0..65535) to 8 bits (0..255) and repeat it 3 times."""
    values = np.asarray(image, dtype=np.float64)
    eight = np.round(np.clip(values, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
    return Image.fromarray(np.stack([eight] * 3, axis=-1))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_gray_to_rgb(image)
    if mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 255)
        gray = np.round(values).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA")
    if has_alpha or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _white_composite(image)
    return image.convert("RGB")


def decode_rgb(source: str | os.PathLike | io.BytesIO) -> Image.Image:
    """Open, fully decode, orient and convert one image file to RGB.

    Raises whatever PIL raises for a bad file (OSError and friends,
    DecompressionBombError); callers decide what a bad file means.
    """
    with Image.open(source) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
    return to_rgb(upright)


def resize_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """Resize the short side to image_size (bicubic), then crop the centre square."""
    width, height = image.size
    if (width, height) == (image_size, image_size):
        return image
    scale = image_size / min(width, height)
    new_w = max(image_size, round(width * scale))
    new_h = max(image_size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - image_size) // 2
    top = (new_h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return from_uint8(pixels)


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"data.image_size must be a positive integer, got {image_size!r}")
    return image_size


def open_image_file(path: str | os.PathLike) -> Image.Image:
    """One image file the user named (a reference picture, a sample), decoded to RGB.

    A missing or unreadable file is a UserError, since the user named it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"image file not found: {path}")
    try:
        return decode_rgb(path)
    except Exception as error:  # any decoding failure is the file's fault
        raise UserError(f"cannot read {path} as an image: {_reason(error, path)}") from error


def load_image_file(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """One user-given image as float (3, S, S) in [-1, 1] (see :func:`open_image_file`)."""
    image_size = _check_image_size(image_size)
    return pil_to_tensor(resize_center_crop(open_image_file(path), image_size))


def _reason(error: BaseException, path: Path | None = None) -> str:
    """A short one-line description of why a file was rejected (without
    repeating the file's full path, which the caller names already)."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        lines = str(error).strip().splitlines()
        text = lines[0] if lines else ""
        if path is not None:
            text = text.replace(f" '{path}'", "").replace(str(path), path.name)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _warn_skipped(where: str, skipped: Sequence[tuple[str, str]], total: int) -> None:
    """Log ONE warning that counts the skipped items and names the first few."""
    if not skipped:
        return
    named = "; ".join(f"{name} ({reason})" for name, reason in skipped[:_NAMED_IN_WARNING])
    more = len(skipped) - _NAMED_IN_WARNING
    tail = f"; and {more} more" if more > 0 else ""
    log.warning(
        "skipped %d of %d images in %s that could not be read: %s%s",
        len(skipped), total, where, named, tail,
    )


# ----------------------------------------------------------------------------
# Folder source
# ----------------------------------------------------------------------------


def list_image_files(root: Path) -> list[Path]:
    """Every file under root (recursively) with an image extension, sorted.

    Symlinked folders are followed once each (a link back to an ancestor is not
    followed again, so loops end). Directories are never returned, even when
    their name ends in .png."""
    found: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class FolderImages(torch.utils.data.Dataset):
    """Every readable image under a folder, as float (3, S, S) in [-1, 1].

    Attributes: ``files`` (the images used, in order) and ``skipped``
    (relative path, reason) for each file left out."""

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.image_size = _check_image_size(image_size)
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise UserError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise UserError(f"data.path must be a folder of images, but {self.root} is a file")
        candidates = list_image_files(self.root)
        self.files: list[Path] = []
        self.skipped: list[tuple[str, str]] = []
        for path in candidates:
            try:
                decode_rgb(path)
            # Deliberately broad: PIL raises many kinds of errors on damaged
            # files (OSError, SyntaxError, ValueError, EOFError, struct.error,
            # DecompressionBombError, ...). Each reason is reported below.
            except Exception as error:
                self.skipped.append((path.relative_to(self.root).as_posix(), _reason(error, path)))
            else:
                self.files.append(path)
        _warn_skipped(str(self.root), self.skipped, len(candidates))
        if not self.files:
            extensions = ", ".join(IMAGE_EXTENSIONS)
            raise UserError(
                f"no readable image in {self.root} "
                f"({len(candidates)} files with extensions {extensions} found)"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            image = decode_rgb(path)
        except Exception as error:  # changed on disk after the source was opened
            raise UserError(f"{path} could no longer be read as an image: {_reason(error, path)}") from error
        return pil_to_tensor(resize_center_crop(image, self.image_size))


# ----------------------------------------------------------------------------
# Hugging Face source (offline only)
# ----------------------------------------------------------------------------


def _load_hf_dataset(path: Path, split: str):
    """A datasets.Dataset from save_to_disk output (Dataset or DatasetDict) or
    from a local image folder read with the "imagefolder" builder."""
    import datasets  # heavy; imported only for this source

    saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    try:
        if saved:
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as error:
        raise UserError(f"cannot load a Hugging Face dataset from {path}: {_reason(error)}") from error
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise UserError(
                f"{path} has no split {split!r} (set data.hf_split); "
                f"available splits: {', '.join(sorted(loaded))}"
            )
        loaded = loaded[split]
    return loaded


def _decode_hf_value(value: Any) -> Image.Image:
    """One cell of the image column -> RGB PIL image."""
    if isinstance(value, Image.Image):
        value.load()
        return to_rgb(ImageOps.exif_transpose(value))
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        if value.get("bytes") is not None:
            return decode_rgb(io.BytesIO(value["bytes"]))
        return decode_rgb(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return decode_rgb(io.BytesIO(value))
    if isinstance(value, str):
        return decode_rgb(value)
    raise ValueError(f"not an image value: {type(value).__name__}")


class HFImages(torch.utils.data.Dataset):
    """The readable images of one column of a local Hugging Face dataset.

    The column is read undecoded (bytes or path) and decoded here, so one bad
    row is skipped and reported instead of crashing a training run. Attributes:
    ``indices`` (rows used) and ``skipped`` ("row N", reason)."""

    def __init__(self, path: str | os.PathLike, image_size: int,
                 split: str = "train", column: str = "image"):
        import datasets

        self.image_size = _check_image_size(image_size)
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise UserError(f"Hugging Face dataset folder not found: {self.path}")
        table = _load_hf_dataset(self.path, split)
        if column not in table.column_names:
            raise UserError(
                f"{self.path} has no column {column!r} (set data.hf_image_column); "
                f"available columns: {', '.join(table.column_names)}"
            )
        table = table.select_columns([column])
        if isinstance(table.features[column], datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
        self.table = table
        self.column = column
        self.indices: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        for row, record in enumerate(table):
            try:
                _decode_hf_value(record[column])
            except Exception as error:  # broad for the same reason as FolderImages
                self.skipped.append((f"row {row}", _reason(error)))
            else:
                self.indices.append(row)
        _warn_skipped(f"{self.path} (column {column!r})", self.skipped, len(table))
        if not self.indices:
            raise UserError(f"no readable image in column {column!r} of {self.path}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        value = self.table[self.indices[index]][self.column]
        image = _decode_hf_value(value)
        return pil_to_tensor(resize_center_crop(image, self.image_size))


# ----------------------------------------------------------------------------
# The one entry point
# ----------------------------------------------------------------------------


def open_images(data: Any) -> torch.utils.data.Dataset:
    """The image source described by the ``[data]`` config section.

    ``data`` needs ``source`` ("folder" | "hf" | "shapes"), ``image_size`` and,
    by source: ``path`` (folder, hf), ``hf_split`` / ``hf_image_column`` (hf,
    defaults "train" / "image"), ``count`` and ``seed`` (shapes). Any object
    with these attributes works (a config dataclass, a SimpleNamespace)."""
    source = getattr(data, "source", None)
    image_size = _check_image_size(getattr(data, "image_size", None))
    if source == "folder":
        return FolderImages(_required_path(data), image_size)
    if source == "hf":
        return HFImages(
            _required_path(data), image_size,
            split=getattr(data, "hf_split", "train") or "train",
            column=getattr(data, "hf_image_column", "image") or "image",
        )
    if source == "shapes":
        from clipvqd.shapes.dataset import ShapesImages

        return ShapesImages(seed=data.seed, count=data.count, image_size=image_size)
    raise UserError(f"data.source must be one of {', '.join(SOURCES)}, got {source!r}")


def _required_path(data: Any) -> Path:
    path = getattr(data, "path", None)
    if not path:
        raise UserError(f"data.path is required when data.source = {data.source!r}")
    return Path(path).expanduser()


# ----------------------------------------------------------------------------
# Edges: uint8 pixels, PNG files, grids
# ----------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1], (N, 3, H, W) or (3, H, W) -> uint8 (N, H, W, 3)
    or (H, W, 3). Values outside [-1, 1] are clipped; x -> round((x + 1) * 127.5)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim not in (3, 4):
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) images, got shape {images.shape}")
    pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -3, -1))


def from_uint8(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float (N, 3, H, W) or (3, H, W) in [-1, 1]:
    v -> v / 127.5 - 1, the exact inverse of to_uint8 on uint8 values.

    The arithmetic is done in numpy: it is single-threaded, which keeps data
    loading cheap when torch's thread pool competes for a few busy cores."""
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.detach().cpu().numpy()
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim not in (3, 4):
        raise ValueError(f"expected (N, H, W, C) or (H, W, C) pixels, got shape {pixels.shape}")
    floats = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(floats, -1, -3)))


def _as_pixels(images: Any) -> np.ndarray:
    """Float tensor in [-1, 1] (channels first) or uint8 array (channels last)
    -> uint8 numpy, channels last."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        return to_uint8(images)
    pixels = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected a float tensor in [-1, 1] or uint8 pixels, got {pixels.dtype}")
    return pixels


def save_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write one image as PNG, creating the parent folder.

    ``image``: a float tensor (3, H, W) in [-1, 1] (a leading batch of 1 is
    allowed), or uint8 pixels (H, W, 3) or (H, W)."""
    pixels = _as_pixels(image)
    if pixels.ndim == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 3))):
        raise ValueError(f"save_png takes one image, got pixel shape {pixels.shape}")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def make_grid(images: torch.Tensor | np.ndarray, nrow: int, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """Tile N images into one uint8 (H, W, 3) picture, ``nrow`` images per row.

    ``images``: float (N, 3, h, w) in [-1, 1] or uint8 (N, h, w, 3). Tiles are
    separated (and framed) by ``padding`` pixels of gray level ``pad_value``;
    the last row is filled left to right and the rest left as padding."""
    pixels = _as_pixels(images)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"make_grid takes (N, 3, h, w) or (N, h, w, 3) images, got {pixels.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    count, h, w, _ = pixels.shape
    cols = min(nrow, max(count, 1))
    rows = max(1, -(-count // cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3),
                   pad_value, dtype=np.uint8)
    for i in range(count):
        r, c = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid
