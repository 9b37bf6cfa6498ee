"""The judge: read a shapes-world image's attributes back, with no learned weights.

Given an image it estimates, in this order:
  background  the nearest named background colour of the border pixels' median;
  foreground  a soft mask alpha in [0, 1]: how far each pixel has moved from the
              background towards the shape's colour (anti-aliased edges give
              fractions, so the mask's sum is the shape's area);
  colour      the nearest named shape colour of the foreground's core pixels;
  size        small or large, by the mask's area (the world keeps the two far apart
              for every shape, jitter included);
  position    the nominal position nearest to the mask's centroid;
  shape       the best soft-IoU match of the mask against ideal masks of each
              shape, centred at the centroid, scaled to the measured area, at
              every rotation within the shape's symmetry period (so rotation
              jitter, or none, is handled alike).

On clean renders it is right every time (the tests check thousands). On
generated images its answers are the measured alignment numbers.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from clipvqd.shapes.world import (
    ATTRIBUTE_NAMES,
    BACKGROUNDS,
    COLOURS,
    JITTER_SCALE,
    POSITION_CENTRES,
    SHAPE_RADIUS_FACTOR,
    SHAPES,
    SIZE_RADII,
    shape_vertices,
)

MIN_CONTRAST = 40.0  # below this RGB distance from the background nothing is foreground
ROTATION_STEP_DEGREES = 3.0


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((colours - rgb) ** 2).sum(axis=1)))]


@lru_cache(maxsize=None)
def _polygon(shape: str) -> tuple[float, int, tuple[float, ...]]:
    """(angle of the first vertex, vertex count, vertex radii) of a unit star-shaped polygon."""
    vertices = shape_vertices(shape, 0.0)
    angles = np.arctan2(vertices[:, 1], vertices[:, 0])
    radii = tuple(float(r) for r in np.hypot(vertices[:, 0], vertices[:, 1]))
    return float(angles[0]), len(vertices), radii


@lru_cache(maxsize=None)
def unit_area(shape: str) -> float:
    """Area of the shape at circumradius 1 (shoelace formula; pi for the circle)."""
    if shape == "circle":
        return math.pi
    v = shape_vertices(shape, 0.0)
    x, y = v[:, 0], v[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _size_threshold() -> float:
    """Area (as a fraction of the image) between the largest small and the smallest large shape."""
    def area(size: str, shape: str, scale: float) -> float:
        return unit_area(shape) * (SIZE_RADII[size] * SHAPE_RADIUS_FACTOR[shape] * scale) ** 2

    largest_small = max(area("small", s, 1 + JITTER_SCALE) for s in SHAPES)
    smallest_large = min(area("large", s, 1 - JITTER_SCALE) for s in SHAPES)
    assert largest_small < smallest_large, "the world's small and large shapes overlap in area"
    return math.sqrt(largest_small * smallest_large)


SIZE_AREA_THRESHOLD = _size_threshold()


def _boundary_radius(shape: str, theta: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Distance from the centre to the unit shape's edge along angle theta, per rotation.

    theta: (P,) pixel angles; rotation: (R,) radians. Returns (R, P). Every
    shape here is star-shaped about its centre, so one radius per angle suffices.
    """
    if shape == "circle":
        return np.ones((len(rotation), len(theta)))
    first, n, radii = _polygon(shape)
    step = 2 * math.pi / n
    t = np.mod(theta[None, :] - rotation[:, None] - first, 2 * math.pi)
    k = np.minimum((t // step).astype(np.int64), n - 1)
    u = t - k * step
    r = np.asarray(radii)
    r1, r2 = r[k], r[(k + 1) % n]
    return r1 * r2 * math.sin(step) / (r1 * np.sin(u) + r2 * np.sin(step - u))


def _symmetry_period(shape: str) -> float:
    return 2 * math.pi if shape == "circle" else 2 * math.pi / {"square": 4, "triangle": 3, "star": 5}[shape]


ANGLE_BINS = 720  # boundary radius tables at half-degree resolution
_ROTATION_SHIFT = int(round(ROTATION_STEP_DEGREES * ANGLE_BINS / 360))


@lru_cache(maxsize=None)
def _boundary_table(shape: str) -> np.ndarray:
    """Unit boundary radius at angles 2*pi*k/ANGLE_BINS, k = 0..ANGLE_BINS-1, rotation 0."""
    angles = np.arange(ANGLE_BINS) * (2 * math.pi / ANGLE_BINS)
    return _boundary_radius(shape, angles, np.zeros(1))[0]


@lru_cache(maxsize=None)
def _rotated_tables(shape: str) -> np.ndarray:
    """(R, ANGLE_BINS): the boundary table at every searched rotation in the symmetry period."""
    table = _boundary_table(shape)
    if shape == "circle":
        return table[None, :]
    count = int(round(math.degrees(_symmetry_period(shape)) / ROTATION_STEP_DEGREES))
    return np.stack([np.roll(table, k * _ROTATION_SHIFT) for k in range(count)])


def _match_shape(alpha: np.ndarray, cx: float, cy: float, area_px: float) -> str:
    """Best soft-IoU shape for the mask `alpha` (H, W), centroid (cx, cy) and area in pixels."""
    h, w = alpha.shape
    best_shape, best_iou = SHAPES[0], -1.0
    # a window around the centroid that holds every candidate (sized for the smallest unit area: the
    # largest circumradius at this area)
    reach = math.sqrt(area_px / min(unit_area(s) for s in SHAPES)) + 3
    y0, y1 = max(0, int(cy - reach)), min(h, int(math.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(math.ceil(cx + reach)) + 1)
    window = alpha[y0:y1, x0:x1].ravel()
    ys, xs = np.mgrid[y0:y1, x0:x1]
    dx, dy = (xs + 0.5 - cx).ravel(), (ys + 0.5 - cy).ravel()
    rho = np.hypot(dx, dy)
    bins = np.round(np.mod(np.arctan2(dy, dx), 2 * math.pi) * (ANGLE_BINS / (2 * math.pi))).astype(np.int64)
    bins %= ANGLE_BINS
    outside_mass = alpha.sum() - window.sum()
    for shape in SHAPES:
        radius = math.sqrt(area_px / unit_area(shape))
        edge = _rotated_tables(shape)[:, bins] * radius
        ideal = np.clip(0.5 + edge - rho[None, :], 0.0, 1.0)  # about one pixel of soft edge
        intersection = np.minimum(ideal, window[None, :]).sum(axis=1)
        union = window.sum() + ideal.sum(axis=1) - intersection + outside_mass
        iou = float((intersection / np.maximum(union, 1e-9)).max())
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return best_shape


def _as_uint8(image) -> np.ndarray:
    """Accept uint8 HxWx3 arrays, or float (3, H, W) tensors/arrays in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.transpose(1, 2, 0)
        if image.size and (np.nanmin(image) < -1.01 or np.nanmax(image) > 1.01):
            raise ValueError("a float image must hold values in [-1, 1] (convert 0-255 pixels to uint8)")
        image = np.clip(np.round((image.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an image (H, W, 3), got shape {image.shape}")
    return image


def judge(image) -> dict[str, str | None]:
    """Judge one image (uint8 HxWx3, or float 3xHxW in [-1, 1]) -> {attribute: value}.

    A value is None when the image shows no foreground at all (then only the
    background is judged).
    """
    img = _as_uint8(image).astype(np.float64)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    result: dict[str, str | None] = {name: None for name in ATTRIBUTE_NAMES}
    result["background"] = _nearest(bg, BACKGROUNDS)

    diff = img - bg
    dist = np.sqrt((diff ** 2).sum(axis=2))
    strong = np.percentile(dist, 99.5)
    if strong < MIN_CONTRAST:
        return result
    core = dist >= 0.8 * strong
    fg = np.median(img[core], axis=0)
    result["colour"] = _nearest(fg, COLOURS)

    direction = fg - bg
    alpha = np.clip((diff @ direction) / float(direction @ direction), 0.0, 1.0)
    alpha[dist < 0.15 * math.sqrt(float(direction @ direction))] = 0.0
    area_px = float(alpha.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cx = float((alpha * (xs + 0.5)).sum() / area_px)
    cy = float((alpha * (ys + 0.5)).sum() / area_px)

    result["size"] = "large" if area_px / (h * w) > SIZE_AREA_THRESHOLD else "small"
    ux, uy = cx / w, cy / h
    result["position"] = min(POSITION_CENTRES, key=lambda p: (POSITION_CENTRES[p][0] - ux) ** 2
                             + (POSITION_CENTRES[p][1] - uy) ** 2)
    result["shape"] = _match_shape(alpha, cx, cy, area_px)
    return result


def correctness(images, named: dict[str, str]) -> dict[str, np.ndarray]:
    """Per image, is each named attribute judged right? {attribute: bool (N,)} plus "all"."""
    judged = [judge(image) for image in images]
    out = {name: np.array([j[name] == value for j in judged], dtype=bool) for name, value in named.items()}
    out["all"] = np.logical_and.reduce([out[name] for name in named]) if named else np.ones(len(judged), bool)
    return out


def score(images, named: dict[str, str]) -> dict[str, float]:
    """Share of images whose judged value matches, per named attribute, and "all" (every named one)."""
    return {name: float(flags.mean()) if len(flags) else 0.0 for name, flags in correctness(images, named).items()}
