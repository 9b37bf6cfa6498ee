"""The generator's view of the shapes world: images only, never a caption or a held-out pair.

`ShapesImages(seed, count, image_size)[i]` is a pure function of (seed, i):
its attributes and jitter come from a generator seeded by a hash of the two,
so any worker, in any order, gets the same image for the same index.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from clipvqd.shapes.world import Attributes, Jitter, random_attributes, random_jitter, render, to_tensor

_MASK64 = (1 << 64) - 1


def item_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item `index` of data set `seed` (splitmix64 mixing of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class ShapesImages(torch.utils.data.Dataset):
    """`count` shapes-world images at `image_size`, as float (3, H, W) tensors in [-1, 1]."""

    def __init__(self, seed: int, count: int, image_size: int = 64):
        if count < 0 or image_size < 8:
            raise ValueError(f"need count >= 0 and image_size >= 8, got {count}, {image_size}")
        self.seed = seed
        self.count = count
        self.image_size = image_size

    def __len__(self) -> int:
        return self.count

    def _draw(self, index: int) -> tuple[Attributes, Jitter]:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} images")
        generator = torch.Generator().manual_seed(item_seed(self.seed, index))
        attrs = random_attributes(generator, heldout_ok=False)
        return attrs, random_jitter(generator)

    def attributes(self, index: int) -> Attributes:
        """The attributes of image `index` (for tests and inspection; training never reads them)."""
        return self._draw(index)[0]

    def image(self, index: int):
        """Image `index` as uint8 (H, W, 3)."""
        attrs, jitter = self._draw(index)
        return render(attrs, self.image_size, jitter)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(self.image(index))


def write_pngs(dataset: ShapesImages, folder: str | Path, limit: int | None = None) -> list[Path]:
    """Save the first `limit` (default all) images as 000000.png, 000001.png, ... in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(len(dataset) if limit is None else min(limit, len(dataset))):
        path = folder / f"{index:06d}.png"
        Image.fromarray(dataset.image(index)).save(path)
        paths.append(path)
    return paths
