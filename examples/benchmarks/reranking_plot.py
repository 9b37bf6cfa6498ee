"""The reranking ablation's plot (the paper's Section 5.6) from a recorded steps sweep.

    python examples/benchmarks/reranking_plot.py DIR/base/eval/steps-sweep.json OUT.png
    python examples/benchmarks/reranking_plot.py --recorded OUT.png

Judge accuracy (all named attributes right), in-distribution and held-out,
over all samples (reranking off) and over the CLIP-best of 16 (reranking on),
against the sampling steps. ``--recorded`` draws the numbers of the recorded
quality run (the Zen 5 machine, 14c139c, 2026-12-02: RESULTS.md, "Sampling
steps"), whose sweep file was not kept; since the sweep plot draws both
selections itself (``clipvqd eval --sweep``), a new run's ``steps-sweep.png``
shows the in-distribution pair too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipvqd.evaluation.sweep import reranking_pair
from clipvqd.plot import line_chart

SETS = ("in-distribution", "held-out")

# RESULTS.md, "The recorded run", the steps table: steps -> (in-distribution all, best of 16, held-out all, best of 16)
RECORDED = {100: (0.961, 1.000, 0.763, 0.917), 50: (0.956, 1.000, 0.786, 0.917),
            25: (0.943, 0.958, 0.797, 0.875), 10: (0.930, 0.958, 0.766, 0.958)}


def from_sweep(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The four series of a ``clipvqd eval --sweep steps=...`` report."""
    points = json.loads(path.read_text())["points"]
    if not points or list(points[0]["values"]) != ["steps"]:
        raise SystemExit(f"{path}: not a sweep over steps alone (clipvqd eval --sweep steps=...)")
    series: dict[str, list[tuple[int, float]]] = {}
    for group in SETS:
        pair = reranking_pair(f"judge {group}, all samples: all named", points[0]["metrics"])
        if pair is None:
            raise SystemExit(f"{path}: no judge {group} accuracy over all samples and over the best of n")
        for metric in pair:  # "judge held-out, best of 16 by CLIP: all named" -> "held-out, best of 16 by CLIP"
            series[metric[len("judge "):].rsplit(": ", 1)[0]] = [(p["values"]["steps"], p["metrics"][metric]) for p in points]
    return series


def recorded() -> dict[str, list[tuple[int, float]]]:
    names = [f"{g}, {s}" for g in SETS for s in ("all samples", "best of 16 by CLIP")]
    return {name: [(steps, row[i]) for steps, row in RECORDED.items()] for i, name in enumerate(names)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", nargs="?", type=Path, help="a steps-sweep.json written by clipvqd eval --sweep")
    p.add_argument("out", type=Path)
    p.add_argument("--recorded", action="store_true", help="the recorded run's numbers (RESULTS.md)")
    args = p.parse_args()
    if args.recorded == (args.sweep is not None):
        p.error("give a sweep file or --recorded")
    series = recorded() if args.recorded else from_sweep(args.sweep)
    line_chart(series, title="reranking off (all samples) and on (best of 16 by CLIP)", x_label="sampling steps",
               y_label="judge: all named attributes right", y_range=(0.0, 1.0)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
