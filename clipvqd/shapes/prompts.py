"""Evaluation prompt sets of the shapes world: in-distribution and held-out.

Each prompt names the shape and colour and some of the other attributes, in
canonical words ("a small red circle at the top on a gray background"). The
in-distribution set uses only shape x colour pairs the generator has seen;
the held-out set names only `HELDOUT_PAIRS` (the analogue of the paper's
out-of-distribution prompts). Both sets are fixed: built from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipvqd.shapes.captions import describe
from clipvqd.shapes.world import BACKGROUNDS, COLOURS, HELDOUT_PAIRS, POSITIONS, SHAPES, SIZES

PROMPT_SEED = 1234
PROMPTS_PER_PAIR = {"in_distribution": 3, "heldout": 8}
PROMPT_FILES = {"in_distribution": "in_distribution.txt", "heldout": "heldout.txt"}

# Which optional attributes each prompt names, cycling; shape and colour are always named.
_OPTIONAL_SETS = (
    ("size", "position", "background"),
    ("size", "position"),
    ("background",),
    ("size", "background"),
    ("position",),
    ("position", "background"),
    ("size",),
    (),
)


def _prompts_for(pairs: list[tuple[str, str]], per_pair: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for index, (shape, colour) in enumerate(pairs):
        for k in range(per_pair):
            named = {"shape": shape, "colour": colour}
            values = {
                "size": SIZES[int(torch.randint(len(SIZES), (1,), generator=generator))],
                "position": POSITIONS[int(torch.randint(len(POSITIONS), (1,), generator=generator))],
                "background": tuple(BACKGROUNDS)[int(torch.randint(len(BACKGROUNDS), (1,), generator=generator))],
            }
            for name in _OPTIONAL_SETS[(index + k) % len(_OPTIONAL_SETS)]:
                named[name] = values[name]
            prompts.append((describe(named), named))
    return prompts


def in_distribution_prompts() -> list[tuple[str, dict[str, str]]]:
    """[(prompt, {attribute: value named})] over every shape x colour pair the generator sees."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELDOUT_PAIRS]
    return _prompts_for(pairs, PROMPTS_PER_PAIR["in_distribution"], PROMPT_SEED)


def heldout_prompts() -> list[tuple[str, dict[str, str]]]:
    """[(prompt, {attribute: value named})], each naming a held-out shape x colour pair."""
    return _prompts_for(list(HELDOUT_PAIRS), PROMPTS_PER_PAIR["heldout"], PROMPT_SEED + 1)


def write_prompt_files(folder: str | Path) -> dict[str, Path]:
    """Write in_distribution.txt and heldout.txt (one prompt a line) into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, prompts in (("in_distribution", in_distribution_prompts()), ("heldout", heldout_prompts())):
        path = folder / PROMPT_FILES[key]
        path.write_text("".join(prompt + "\n" for prompt, _ in prompts), encoding="utf-8")
        paths[key] = path
    return paths
