"""Does a training stage's loss fall? Mean of a logged term over the first
tenth of the logged steps against the last tenth.

    python examples/benchmarks/loss_curve.py PROJECT_DIR/diffusion/log.jsonl [--term vlb]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def first_last_tenth(log: Path, term: str) -> dict:
    values = [row[term] for row in map(json.loads, Path(log).read_text().splitlines()) if term in row]
    if len(values) < 10:
        raise SystemExit(f"{log}: only {len(values)} logged values of {term}; log more often")
    tenth = len(values) // 10
    first, last = sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
    return {"log": str(log), "term": term, "logged": len(values), "first tenth": first, "last tenth": last,
            "last / first": last / first}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--term", default="vlb")
    args = parser.parse_args()
    print(json.dumps(first_last_tenth(args.log, args.term), indent=2))
