"""What the codes mean and what the denoiser reads: two measurements on a trained shapes project.

1. Code synonyms: the tokenizer's codes at the four corner tokens of the
   training images whose 4x4 corner patch is one flat background colour. A
   local code would be one code per colour; the report gives, per background
   colour, how many distinct codes the same flat patch gets and their entropy.
2. What the denoiser reads: its cross-entropy on masked tokens at a fixed t,
   with each image's own (alpha-noised) CLIP embedding and with the embedding of
   another image. If the error barely falls as fewer tokens are masked, the
   model predicts from the condition, not from the tokens around.

    python examples/benchmarks/token_diagnostics.py PROJECT_DIR [--alpha 0.5] [--model diffusion]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipvqd.conditioning import pseudo_text_embedding
from clipvqd.diffusion import Schedule
from clipvqd.models import load_denoiser
from clipvqd.shapes.dataset import ShapesImages


def corner_synonyms(codes: np.ndarray, dataset: ShapesImages, grid: int, patch: int) -> dict:
    by_background: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    corners = (0, grid - 1, grid * (grid - 1), grid * grid - 1)
    for i in range(len(codes)):
        image = dataset.image(i)
        for pos in corners:
            r, c = divmod(pos, grid)
            pixels = image[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].reshape(-1, 3)
            if (pixels == pixels[0]).all():
                by_background[dataset.attributes(i).background][int(codes[i, pos])] += 1
    report = {}
    for background, counts in sorted(by_background.items()):
        p = np.array(list(counts.values()), dtype=float)
        p /= p.sum()
        elsewhere = set().union(*(set(c) for b, c in by_background.items() if b != background))
        report[background] = {"patches": sum(counts.values()), "distinct codes": len(counts),
                              "entropy nats": round(float(-(p * np.log(p)).sum()), 2),
                              "codes also used for another background colour": len(set(counts) & elsewhere)}
    return report


@torch.no_grad()
def masked_cross_entropy(project: Path, model_name: str, alpha: float, count: int = 512) -> dict:
    model, _ = load_denoiser(project / model_name / "model.safetensors")
    model.eval()
    codes = torch.from_numpy(np.load(project / "tokens" / "codes.npy").astype(np.int64))
    embeds = F.normalize(torch.from_numpy(np.load(project / "tokens" / "clip.npy").astype(np.float32)), dim=-1)
    K = model.cfg.num_classes
    schedule = Schedule(K)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(codes), generator=g)[:count]
    x0 = codes[idx]
    own = pseudo_text_embedding(embeds[idx], alpha, g)
    other = own[torch.randperm(len(own), generator=g)]
    report = {}
    for t in (100, 70, 50, 30, 10):
        x_t = schedule.q_sample(x0, torch.full((len(x0),), t), g)
        masked = x_t == K
        row = {"masked share": round(float(masked.float().mean()), 2)}
        for name, cond in (("own condition", own), ("another image's condition", other)):
            nll = torch.cat([
                -model(x_t[i:i + 128], torch.full((len(x_t[i:i + 128]),), t), cond[i:i + 128])
                .gather(1, x0[i:i + 128].unsqueeze(1)).squeeze(1)
                for i in range(0, len(x0), 128)
            ])
            row[name] = round(float(nll[masked].mean()), 3)
        report[f"t={t}"] = row
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("project", type=Path)
    p.add_argument("--alpha", type=float, default=0.5, help="pseudo-text noise on the condition (training's value)")
    p.add_argument("--model", default="diffusion", help="diffusion or diffusion-cfg")
    a = p.parse_args()
    torch.set_num_threads(2)
    meta = json.loads((a.project / "tokens" / "meta.json").read_text())
    codes = np.load(a.project / "tokens" / "codes.npy")
    grid = meta["grid"][0]
    if meta["data"]["source"] != "shapes":
        raise SystemExit("token_diagnostics.py reads the shapes world's own images: this project is not a shapes project")
    dataset = ShapesImages(meta["data"]["seed"], len(codes), meta["image_size"])
    report = {
        "flat corner patches: codes per background colour": corner_synonyms(
            codes, dataset, grid, meta["image_size"] // grid),
        f"masked-token cross-entropy (nats), alpha {a.alpha}": masked_cross_entropy(a.project, a.model, a.alpha),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
