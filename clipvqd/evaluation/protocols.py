"""What each evaluation protocol measures on: its prompts, and the shapes world's FID reference.

    prompts, per_prompt = protocol_prompts(config, project)
    folder = shapes_reference(config, project)   # fresh renders, written once to the cache
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from clipvqd import checkpoint
from clipvqd.config import Config
from clipvqd.errors import UserError
from clipvqd.project import Project

FFHQ64_PROMPTS = Path(__file__).resolve().parent.parent / "prompts" / "ffhq64.txt"
FFHQ_PREFIX = "a photograph of "
REFERENCE_SEED_OFFSET = 1_000_003  # shapes reference renders: data.seed + this, never the training seed
NUMBER_PREFIX = re.compile(r"^#\d+ ")  # eval numbers its labels when a prompt repeats (a caption drawn twice)


def prompt_text(label: str) -> str:
    """The prompt a sample's label stands for: without the '#i ' that eval numbers labels with
    (so that repeated captions stay separate prompts); the number is not part of the text."""
    return NUMBER_PREFIX.sub("", label)


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (prompts, captions), stripped; '#' starts a comment line."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path}: {'a folder, not a text file' if Path(path).is_dir() else 'no such file'}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise UserError(f"{what} {path}: holds no lines (only blank and '#' lines)")
    return lines


def protocol_prompts(config: Config, project: Project) -> tuple[list[str], int]:
    """(prompts, samples per prompt) of the configured protocol."""
    ec = config.eval
    cap = (lambda items: _spread(items, ec.max_prompts)) if ec.max_prompts else (lambda items: items)
    if ec.protocol == "shapes":
        from clipvqd.shapes.prompts import heldout_prompts, in_distribution_prompts

        prompts = [p for p, _ in cap(in_distribution_prompts())] + [p for p, _ in cap(heldout_prompts())]
        return prompts, ec.samples_per_prompt
    if ec.protocol == "ffhq64":
        path = project.resolve(ec.prompts_file) if ec.prompts_file else FFHQ64_PROMPTS
        lines = read_lines(path, "eval.prompts_file")
        return cap([line if line.startswith(FFHQ_PREFIX) else FFHQ_PREFIX + line for line in lines]), ec.samples_per_prompt
    if not ec.captions_file:
        raise UserError("the coco protocol needs eval.captions_file: a text file of captions, one a line")
    captions = read_lines(project.resolve(ec.captions_file), "eval.captions_file")
    g = torch.Generator().manual_seed(config.project.seed)
    if ec.caption_count <= len(captions):
        picks = torch.randperm(len(captions), generator=g)[:ec.caption_count]
    else:  # more draws than captions: with replacement
        picks = torch.randint(len(captions), (ec.caption_count,), generator=g)
    return cap([captions[int(i)] for i in picks]), 1


def shapes_reference(config: Config, project: Project) -> Path:
    """eval.reference_count fresh renders of the generator's distribution, written once to the cache."""
    from clipvqd.shapes.dataset import ShapesImages, write_pngs

    folder = project.cache / "shapes-reference"
    meta = {"seed": config.data.seed + REFERENCE_SEED_OFFSET, "count": config.eval.reference_count,
            "image_size": config.data.image_size}
    meta_file = folder / "meta.json"
    if meta_file.is_file() and meta_file.read_text(errors="replace") == json.dumps(meta):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    write_pngs(ShapesImages(meta["seed"], meta["count"], meta["image_size"]), folder / "images")
    checkpoint.atomic_write_text(meta_file, json.dumps(meta))
    return folder


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spaced through ``items`` (all of them when n >= len), so a
    short evaluation still covers every part of an ordered prompt set."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]
