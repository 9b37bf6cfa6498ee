"""`clipvqd rerank`: keep the best K samples per prompt by CLIP score (raw
cosine between the L2-normalised image and text embeddings, as the paper).

reranked/<name>/ holds the kept PNGs and scores.jsonl (file, prompt, seed,
clip_score, rank). `clipvqd sample --rerank` calls :func:`keep_best` inline
with the scores it computed before the images were written as 8-bit PNGs;
`clipvqd rerank` scores the PNGs, so the two differ in the last digits.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from clipvqd import checkpoint
from clipvqd.config import Config
from clipvqd.data import open_image_file, pil_to_tensor, resize_center_crop
from clipvqd.errors import UserError
from clipvqd.evaluation.protocols import prompt_text
from clipvqd.project import Project
from clipvqd.stages.common import configured_clip, device_of


def read_index(samples_dir: Path) -> list[dict]:
    index = Path(samples_dir) / "index.jsonl"
    if not Path(samples_dir).is_dir():
        raise UserError(f"{samples_dir}: no such samples folder (make one with `clipvqd sample`)")
    if not index.is_file():
        raise UserError(f"{samples_dir} has no index.jsonl: it was not written by `clipvqd sample` (rerun it)")
    rows = []
    for n, line in enumerate(index.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{index}: line {n} is not JSON; rerun `clipvqd sample`") from None
        if not (isinstance(row, dict) and isinstance(row.get("file"), str) and isinstance(row.get("prompt"), str)
                and isinstance(row.get("clip_score", 0.0), (int, float))):
            raise UserError(f"{index}: line {n} is not a sample record (file, prompt, clip_score); rerun `clipvqd sample`")
        rows.append(row)
    if not rows:
        raise UserError(f"{index} lists no samples; rerun `clipvqd sample`")
    return rows


def keep_best(project: Project, samples_dir: Path, rows: list[dict], keep: int) -> Path:
    """Copy the ``keep`` highest-scoring images of each prompt to reranked/<name>/."""
    out = project.reranked(Path(samples_dir).resolve().name)  # resolved: `rerank .` names the folder it is
    if out.exists():
        shutil.rmtree(out)
    kept = []
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        best = sorted((r for r in rows if r["prompt"] == prompt), key=lambda r: -r["clip_score"])[:keep]
        for rank, r in enumerate(best):
            (out / Path(r["file"]).parent).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(samples_dir) / r["file"], out / r["file"])
            kept.append({**r, "rank": rank})
    checkpoint.atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    return out


def run(config: Config, project: Project, samples_dir: Path) -> dict:
    samples_dir = Path(samples_dir)
    rows = read_index(samples_dir)
    device = device_of(config)
    clip = configured_clip(config, project, device)
    # a label eval numbered ('#3 a red circle') is scored against its text, not the number
    text_prompts = sorted({prompt_text(r["prompt"]) for r in rows if not r["prompt"].startswith("image:")})
    text = dict(zip(text_prompts, clip.embed_texts(text_prompts).float())) if text_prompts else {}
    missing = [r for r in rows if not (samples_dir / r["file"]).is_file()]
    if missing:
        raise UserError(f"{samples_dir / missing[0]['file']} is listed in index.jsonl but missing; rerun `clipvqd sample`")
    rescored = []
    for r in rows:
        words = prompt_text(r["prompt"])
        if words in text:
            picture = open_image_file(samples_dir / r["file"])
            image = pil_to_tensor(resize_center_crop(picture, min(picture.size))).unsqueeze(0)
            r = {**r, "clip_score": round(float((clip.embed_images(image).float()[0] * text[words]).sum()), 6)}
        rescored.append(r)
    out = keep_best(project, samples_dir, rescored, config.rerank.keep)
    prompts = len({r["prompt"] for r in rows})
    best = [max(r["clip_score"] for r in rescored if r["prompt"] == p) for p in {r["prompt"] for r in rescored}]
    most = max(Counter(r["prompt"] for r in rows).values())
    return {"reranked": str(out), "prompts": prompts, "kept per prompt": min(config.rerank.keep, most),
            "mean best CLIP score (cosine)": sum(best) / len(best),
            "mean CLIP score, all samples": sum(r["clip_score"] for r in rescored) / len(rescored)}

