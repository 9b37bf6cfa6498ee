"""How well does a trained VQ keep what the shapes judge reads?

Encodes fresh renders (a seed the VQ never trained on) to argmax codes,
decodes them, and reports: the share of reconstructions whose judged
attributes all equal the originals' (and per attribute), PSNR, codebook usage
and perplexity over the whole set.

    python examples/benchmarks/vq_quality.py PROJECT_DIR [--count 500]
    python examples/benchmarks/vq_quality.py PROJECT_DIR --tokens   # judge the decoded tokens/ instead
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import numpy as np

from clipvqd.config import load_config
from clipvqd.models import load_vq
from clipvqd.shapes.dataset import ShapesImages
from clipvqd.shapes.judge import judge
from clipvqd.shapes.world import ATTRIBUTE_NAMES
from clipvqd.vqgan import codebook_stats

FRESH_SEED = 987_654  # never a training seed


def measure(project_dir: Path, count: int, from_tokens: bool = False) -> dict:
    """Judge reconstructions of ``count`` fresh renders, or (``from_tokens``) the
    decoded codes of the first ``count`` training images as tokenize stored them."""
    vq, _ = load_vq(Path(project_dir) / "vq" / "model.safetensors")
    size = vq.cfg.image_size
    if from_tokens:
        config = load_config(Path(project_dir) / "clipvqd.toml")
        data = ShapesImages(seed=config.data.seed, count=config.data.count, image_size=size)
        stored = np.load(Path(project_dir) / "tokens" / "codes.npy", allow_pickle=False)[:count]
        count = len(stored)
        codes = torch.from_numpy(stored.astype(np.int64)).view(count, vq.cfg.latent_size, vq.cfg.latent_size)
    else:
        data = ShapesImages(seed=FRESH_SEED, count=count, image_size=size)
    originals = torch.stack([data[i] for i in range(count)])
    with torch.no_grad():
        if not from_tokens:
            codes = torch.cat([vq.encode(originals[i:i + 64]) for i in range(0, count, 64)])
        recon = torch.cat([vq.decode(codes[i:i + 64]) for i in range(0, count, 64)]).clamp(-1, 1)
    usage, perplexity = codebook_stats(codes, vq.cfg.codebook_size)
    return {
        "images": count, "source": "tokens/codes.npy" if from_tokens else "fresh renders", "image_size": size,
        **judge_reconstructions(data, originals, recon),
        "codebook usage": usage, "perplexity": perplexity, "codebook size": vq.cfg.codebook_size,
    }


def judge_reconstructions(data: ShapesImages, originals: torch.Tensor, recon: torch.Tensor) -> dict:
    """Judge ``recon[i]`` against the attributes of ``data[i]``: the share with every
    attribute right, per attribute, PSNR, and shape right by size and shape."""
    agree = {n: 0 for n in ATTRIBUTE_NAMES}
    all_ok = 0
    shape_right: dict[str, list[int]] = {}  # "small star" -> [right, of]
    for i in range(len(recon)):
        truth, seen = data.attributes(i).as_dict(), judge(recon[i])
        ok = {n: truth[n] == seen[n] for n in ATTRIBUTE_NAMES}
        for n in ATTRIBUTE_NAMES:
            agree[n] += ok[n]
        all_ok += all(ok.values())
        tally = shape_right.setdefault(f"{truth['size']} {truth['shape']}", [0, 0])
        tally[0] += ok["shape"]
        tally[1] += 1
    mse = ((recon - originals) / 2).pow(2).mean().item()  # images in [0, 1]
    return {
        "judge all attributes": all_ok / len(recon),
        **{f"judge {n}": agree[n] / len(recon) for n in ATTRIBUTE_NAMES},
        "PSNR dB": 10 * math.log10(1 / mse),
        "shape right, by size and shape": {k: f"{r}/{n}" for k, (r, n) in sorted(shape_right.items())},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--tokens", action="store_true", help="judge the decoded tokens/ of the training set")
    args = parser.parse_args()
    print(json.dumps(measure(args.project, args.count, args.tokens), indent=2))
