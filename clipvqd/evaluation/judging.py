"""Turning the shapes judge's per-image answers into the reported numbers.

Each sample is a (named, judged) pair: the attributes its prompt names (from
``parse_prompt``) and what the judge reads off the image. A prompt is
"held-out" when it names a held-out shape x colour pair, else
"in-distribution" (this matches both fixed prompt sets by construction).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from clipvqd.shapes.world import ATTRIBUTE_NAMES, HELDOUT_PAIRS, VOCABULARY

GROUPS = ("in-distribution", "held-out")


def group_of(named: dict[str, str]) -> str:
    """'held-out' when the prompt names a held-out shape x colour pair, else 'in-distribution'."""
    return "held-out" if (named.get("shape"), named.get("colour")) in HELDOUT_PAIRS else "in-distribution"


def attribute_accuracy(named: list[dict[str, str]], judged: list[dict]) -> dict[str, float]:
    """Per attribute: the share of images whose prompt names it and whose judged value matches;
    "all named": the share of images where every named attribute matches; "images": the count.

    Images whose prompt names no attribute are left out."""
    pairs = [(n, j) for n, j in zip(named, judged) if n]
    out: dict[str, float] = {}
    for attribute in ATTRIBUTE_NAMES:
        flags = [j.get(attribute) == n[attribute] for n, j in pairs if attribute in n]
        if flags:
            out[attribute] = float(np.mean(flags))
    out["all named"] = float(np.mean([all(j.get(a) == v for a, v in n.items()) for n, j in pairs])) if pairs else 0.0
    out["images"] = len(pairs)
    return out


def best_per_prompt(prompts: list[str], scores: list[float]) -> list[int]:
    """Index of the highest-scoring sample of each prompt (the first one on ties), in prompt order."""
    best: dict[str, int] = {}
    for i, (prompt, score) in enumerate(zip(prompts, scores)):
        if prompt not in best or score > scores[best[prompt]]:
            best[prompt] = i
    return list(best.values())


def distinct_share(keys: list) -> float:
    """Share of distinct items (images given as hashable keys, e.g. a hash of their pixels)."""
    return len(set(keys)) / len(keys) if keys else 0.0


def per_prompt_distinct_share(prompts: list[str], keys: list) -> float:
    """Mean over prompts of the share of distinct images among that prompt's samples."""
    groups: dict[str, list] = {}
    for prompt, key in zip(prompts, keys):
        groups.setdefault(prompt, []).append(key)
    return float(np.mean([distinct_share(v) for v in groups.values()])) if groups else 0.0


def open_attribute_coverage(prompts: list[str], named: list[dict], judged: list[dict]) -> float | None:
    """For prompts that leave an attribute open: the mean, over (prompt, open attribute), of the
    distinct judged values among its samples divided by the attribute's vocabulary size.
    None when every prompt names every attribute."""
    values: dict[tuple[str, str], set] = {}
    for prompt, n, j in zip(prompts, named, judged):
        for attribute in ATTRIBUTE_NAMES:
            if attribute not in n:
                seen = values.setdefault((prompt, attribute), set())
                if j.get(attribute) is not None:
                    seen.add(j[attribute])
    if not values:
        return None
    return float(np.mean([len(v) / len(VOCABULARY[a]) for (_, a), v in values.items()]))


def judge_metrics(prompts: list[str], named: list[dict], judged: list[dict], scores: list[float]) -> dict[str, float]:
    """The flat judge report: accuracy per group, for all samples and for the CLIP-best per prompt."""
    out: dict[str, float] = {}
    best = set(best_per_prompt(prompts, scores))
    per_prompt = max(Counter(prompts).values(), default=1)
    for group in GROUPS:
        members = [i for i, n in enumerate(named) if n and group_of(n) == group]
        if not members:
            continue
        for selection, chosen in (("all samples", members), (f"best of {per_prompt} by CLIP", [i for i in members if i in best])):
            acc = attribute_accuracy([named[i] for i in chosen], [judged[i] for i in chosen])
            for key, value in acc.items():
                out[f"judge {group}, {selection}: {key}"] = value
    return out
