"""The shapes world: vocabularies, attributes, the pure renderer and the held-out split.

An image shows one flat-coloured shape on a plain background. Every image is a
function of its `Attributes` (what a caption can say) plus a small `Jitter`
(what no caption says: a nudge of position, scale and rotation, so that the
world holds many distinct images). `render` is pure: the same arguments give
the same pixels. Randomness only enters through `random_attributes` and
`random_jitter`, each driven by an explicit `torch.Generator`.

Geometry lives in unit coordinates: (0, 0) is the top-left corner of the
image, (1, 1) the bottom-right one. The judge (`judge.py`) reads the same
constants back, so the two never disagree about what "left" or "large" means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# --- vocabularies (the canonical word for each value) -------------------------

SHAPES = ("circle", "square", "triangle", "star")

# Shape colours and background colours are disjoint sets, so a background can
# never equal the shape's colour and every colour word names exactly one role.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")

ATTRIBUTE_NAMES = ("shape", "colour", "background", "size", "position")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
    "position": POSITIONS,
}

# --- geometry ------------------------------------------------------------------

# Nominal centre of the shape for each position, in unit coordinates (x, y).
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
# Nominal "radius" of a shape of each size, as a fraction of the image side.
SIZE_RADII: dict[str, float] = {"small": 0.13, "large": 0.22}
# Each shape's circumradius is SIZE_RADII * this factor, chosen so that all
# four shapes cover roughly the same area at the same size word.
SHAPE_RADIUS_FACTOR: dict[str, float] = {
    "circle": 0.85,
    "square": 0.9,
    "triangle": 1.1,
    "star": 1.1,
}
STAR_INNER_RATIO = 0.5  # inner / outer radius of the five-pointed star
SUPERSAMPLE = 4  # draw at 4x, then downsample (anti-aliasing)

# Jitter bounds: uniform in [-bound, bound].
JITTER_SHIFT = 0.02  # unit coordinates
JITTER_SCALE = 0.06  # relative change of the radius
JITTER_ANGLE = 12.0  # degrees

# Shape x colour pairs that no generator training image ever shows.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "blue"),
    ("square", "yellow"),
    ("triangle", "purple"),
    ("star", "green"),
)


@dataclass(frozen=True)
class Attributes:
    """Everything a caption can say about an image."""

    shape: str
    colour: str
    background: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name in ATTRIBUTE_NAMES:
            value = getattr(self, name)
            if value not in VOCABULARY[name]:
                raise ValueError(f"unknown {name} {value!r}; expected one of {VOCABULARY[name]}")

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}

    @property
    def is_heldout(self) -> bool:
        return (self.shape, self.colour) in HELDOUT_PAIRS


@dataclass(frozen=True)
class Jitter:
    """What captions never say: shift (unit coords), relative scale, rotation (degrees)."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0


def _choice(options, generator: torch.Generator):
    index = int(torch.randint(len(options), (1,), generator=generator))
    return options[index]


def _uniform(bound: float, generator: torch.Generator) -> float:
    return float((torch.rand((), generator=generator, dtype=torch.float64) * 2 - 1) * bound)


def random_attributes(generator: torch.Generator, heldout_ok: bool) -> Attributes:
    """Uniform attributes; with heldout_ok=False the held-out shape x colour pairs never occur.

    Pairs are drawn uniformly among the allowed shape x colour combinations
    (rejection sampling), so each allowed pair is equally likely.
    """
    while True:
        shape = _choice(SHAPES, generator)
        colour = _choice(tuple(COLOURS), generator)
        if heldout_ok or (shape, colour) not in HELDOUT_PAIRS:
            break
    return Attributes(
        shape=shape,
        colour=colour,
        background=_choice(tuple(BACKGROUNDS), generator),
        size=_choice(SIZES, generator),
        position=_choice(POSITIONS, generator),
    )


def random_jitter(generator: torch.Generator) -> Jitter:
    """A mild random nudge of position, scale and rotation."""
    return Jitter(
        dx=_uniform(JITTER_SHIFT, generator),
        dy=_uniform(JITTER_SHIFT, generator),
        scale=1.0 + _uniform(JITTER_SCALE, generator),
        angle=_uniform(JITTER_ANGLE, generator),
    )


def shape_vertices(shape: str, angle_degrees: float = 0.0) -> np.ndarray:
    """Polygon vertices of a unit-circumradius shape centred at 0, as (k, 2) (x, y).

    y grows downwards (image convention); angle 0 points a triangle / star tip up.
    The circle has no vertices and returns an empty array.
    """
    if shape == "circle":
        return np.zeros((0, 2))
    rotation = math.radians(angle_degrees)
    if shape == "square":
        angles = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [1.0] * 4
    elif shape == "triangle":
        angles = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [1.0] * 3
    elif shape == "star":
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [1.0 if k % 2 == 0 else STAR_INNER_RATIO for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.array(
        [[r * math.cos(a + rotation), r * math.sin(a + rotation)] for a, r in zip(angles, radii)]
    )


def shape_geometry(attrs: Attributes, jitter: Jitter | None = None) -> tuple[float, float, float, float]:
    """(centre x, centre y, circumradius, angle in degrees) in unit coordinates."""
    jitter = jitter or Jitter()
    cx, cy = POSITION_CENTRES[attrs.position]
    radius = SIZE_RADII[attrs.size] * SHAPE_RADIUS_FACTOR[attrs.shape] * jitter.scale
    return cx + jitter.dx, cy + jitter.dy, radius, jitter.angle


def render(attrs: Attributes, image_size: int = 64, jitter: Jitter | None = None) -> np.ndarray:
    """Draw the image: uint8 array (image_size, image_size, 3). Pure.

    The shape is drawn at SUPERSAMPLE times the resolution, then box-filtered
    down, which anti-aliases its edges.
    """
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[attrs.background])
    draw = ImageDraw.Draw(canvas)
    fill = COLOURS[attrs.colour]
    cx, cy, radius, angle = shape_geometry(attrs, jitter)
    cx, cy, radius = cx * big, cy * big, radius * big
    if attrs.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        points = shape_vertices(attrs.shape, angle) * radius + np.array([cx, cy])
        draw.polygon([tuple(p) for p in points.tolist()], fill=fill)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def all_attributes(heldout_ok: bool = True) -> list[Attributes]:
    """Every attribute combination (in a fixed order)."""
    return [
        Attributes(s, c, b, z, p)
        for s in SHAPES
        for c in COLOURS
        for b in BACKGROUNDS
        for z in SIZES
        for p in POSITIONS
        if heldout_ok or (s, c) not in HELDOUT_PAIRS
    ]
