"""The `--sweep key=v1,v2` grid over [sample] keys, and the sweep's table and plot."""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

from clipvqd.config import SECTIONS, Config, apply_values
from clipvqd.errors import UserError
from clipvqd.plot import line_chart


def parse_sweeps(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """["guidance=1,2", "sample.truncation=0.8,0.9"] -> [("guidance", ["1", "2"]), ("truncation", [...])]."""
    keys = {f.name for f in dataclasses.fields(SECTIONS["sample"])}
    parsed: list[tuple[str, list[str]]] = []
    for item in sweeps:
        if "=" not in item:
            raise UserError(f"--sweep {item!r}: expected key=v1,v2,... (a [sample] key such as guidance)")
        key, values = (s.strip() for s in item.split("=", 1))
        if key.startswith("sample."):
            key = key[len("sample."):]
        if key in ("n", "name"):
            raise UserError(f"--sweep {item!r}: eval sets sample.{key} itself (samples per prompt: eval.samples_per_prompt)")
        if "." in key or key not in keys:
            raise UserError(f"--sweep {item!r}: {key!r} is not a sample.* key (valid: {', '.join(sorted(keys))})")
        if key in (k for k, _ in parsed):
            raise UserError(f"--sweep: {key} is given twice")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise UserError(f"--sweep {item!r}: no values")
        parsed.append((key, vals))
    return parsed


def grid(config: Config, sweeps: list[tuple[str, list[str]]]) -> list[tuple[dict[str, Any], Config]]:
    """Every grid point (first key slowest): ({key: typed value}, the config at that point)."""
    points = []
    for combo in itertools.product(*[vals for _, vals in sweeps]):
        values = {f"sample.{k}": v for (k, _), v in zip(sweeps, combo)}
        point_config = apply_values(config, values, source="--sweep", from_text=True)
        points.append(({k: getattr(point_config.sample, k) for k, _ in sweeps}, point_config))
    return points


def label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def markdown_table(points: list[dict], metrics: list[str]) -> str:
    """One row per grid point: its values, then the chosen metrics."""
    keys = list(points[0]["values"]) if points else []
    head = keys + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [str(p["values"][k]) for k in keys]
        cells += [_cell(p["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_BEST_OF = re.compile(r"best of (\d+ by CLIP|n)")


def reranking_pair(metric: str, available) -> tuple[str, str] | None:
    """(all samples, best of n) versions of one measure, when ``metric`` is either and both were measured.

    "judge in-distribution, all samples: all named" pairs with "judge
    in-distribution, best of 16 by CLIP: all named", "CLIP score ..., all
    samples" with "CLIP score ..., best of n": reranking off and on.
    """
    generic = _BEST_OF.sub("all samples", metric)
    best = [k for k in available if k != generic and _BEST_OF.sub("all samples", k) == generic]
    return (generic, best[0]) if generic in available and len(best) == 1 else None


def plot(points: list[dict], metric: str, title: str):
    """The metric against the first swept key, one line per combination of the other keys.

    Where the metric was measured both over all samples and over the best of n
    by CLIP, both are drawn (reranking off and on), the latter labelled with
    its selection, e.g. "best of 16 by CLIP".
    """
    keys = list(points[0]["values"])
    x_key, rest = keys[0], keys[1:]
    pair = reranking_pair(metric, set().union(*(p["metrics"] for p in points)))
    if pair:  # (metric, its legend suffix): "all samples" and e.g. "best of 16 by CLIP"
        drawn = [(pair[0], "all samples"), (pair[1], _BEST_OF.search(pair[1]).group(0))]
        y_label = pair[0].replace("all samples", "all samples and best of n")
    else:
        drawn, y_label = [(metric, "")], metric
    series: dict[str, list] = {}
    for p in points:
        others = label({k: p["values"][k] for k in rest})
        for m, selection in drawn:
            name = ", ".join(part for part in (others, selection) if part) or metric
            series.setdefault(name, []).append((p["values"][x_key], p["metrics"].get(m)))
    share = metric.startswith("judge")  # judge metrics are shares in 0..1
    return line_chart(series, title=title, x_label=x_key, y_label=y_label, y_range=(0.0, 1.0) if share else None)
