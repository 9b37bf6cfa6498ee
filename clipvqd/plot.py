"""A tiny line chart drawn with PIL only (matplotlib is not a dependency).

    image = line_chart({"truncation 0.8": [(1, 0.3), (2, 0.5)], ...},
                       title="judge accuracy vs guidance", x_label="guidance", y_label="accuracy")
    image.save("sweep.png")

x values are numbers, or strings (then they are placed at equal steps in order
of first appearance). Each series gets its own colour and a legend entry.
The y axis spans the data, widened to ``y_range`` when given (shares are drawn
on 0..1, so a small difference does not look large).
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0) * 0.1
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(series: dict[str, list[tuple[object, float]]], title: str = "", x_label: str = "",
               y_label: str = "", size: tuple[int, int] = (720, 440),
               y_range: tuple[float, float] | None = None) -> Image.Image:
    """Draw one line per series of (x, y) points; returns an RGB image."""
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 70, width - 180, 44, height - 50
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend = max((probe.textlength(name, font=font) for name in series), default=0.0)
    width = max(width, right + 38 + math.ceil(legend) + 8)  # widen, never clip, the longest legend entry
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    xs_all = [x for points in series.values() for x, _ in points]
    categorical = any(not isinstance(x, (int, float)) for x in xs_all)
    categories = list(dict.fromkeys(str(x) for x in xs_all)) if categorical else []

    def x_value(x) -> float:
        return float(categories.index(str(x))) if categorical else float(x)

    ys = [y for points in series.values() for _, y in points if y is not None and math.isfinite(y)]
    if y_range is not None:
        ys += list(y_range)
    xv = [x_value(x) for x in xs_all]
    x_ticks = list(range(len(categories))) if categorical else (nice_ticks(min(xv), max(xv)) if xv else [0, 1])
    y_ticks = nice_ticks(min(ys), max(ys)) if ys else [0.0, 1.0]
    x0, x1 = (x_ticks[0] - 0.5, x_ticks[-1] + 0.5) if categorical else (x_ticks[0], x_ticks[-1])
    y0, y1 = y_ticks[0], y_ticks[-1]

    def px(x: float, y: float) -> tuple[float, float]:
        u = left + (x - x0) / ((x1 - x0) or 1) * (right - left)
        v = bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top)
        return u, v

    draw.text((left, 6), title, fill="black", font=font)
    for t in y_ticks:
        _, v = px(x0, t)
        draw.line((left, v, right, v), fill=(225, 225, 225))
        draw.text((8, v - 6), _fmt(t), fill="black", font=font)
    for i, t in enumerate(x_ticks):
        u, _ = px(t, y0)
        draw.line((u, bottom, u, bottom + 4), fill="black")
        draw.text((u - 10, bottom + 8), categories[i] if categorical else _fmt(t), fill="black", font=font)
    draw.text(((left + right) // 2 - 3 * len(x_label), height - 20), x_label, fill="black", font=font)
    draw.text((8, top - 20), y_label, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="black")  # the frame over the grid lines

    for k, (name, points) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        coords = [px(x_value(x), y) for x, y in points if y is not None and math.isfinite(y)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for u, v in coords:
            draw.ellipse((u - 3, v - 3, u + 3, v + 3), fill=colour)
        ly = top + 16 * k
        draw.line((right + 12, ly + 6, right + 32, ly + 6), fill=colour, width=3)
        draw.text((right + 38, ly), name, fill="black", font=font)
    return image
