"""How well does a CLIP understand the shapes world? Zero-shot accuracy, cosines, transfer.

    python -m clipvqd.shapes.clip_checks [--weights PATH] [--count 1000]

- `zero_shot_accuracy`: for each attribute, classify clean renders by the most
  similar of the prompts "a {value} shape" (one per value of that attribute).
- `caption_cosines`: mean image-caption cosine for matching and mismatched pairs.
- `transfer_check`: the language-free question in miniature. A small MLP learns
  to read the five attributes from *noised image* embeddings of generator
  images (held-out pairs excluded), then reads CLIP *text* embeddings of
  five-attribute prompts, in-distribution and held-out.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from clipvqd.shapes.captions import caption, describe
from clipvqd.shapes.dataset import ShapesImages
from clipvqd.shapes.world import (
    ATTRIBUTE_NAMES,
    VOCABULARY,
    Attributes,
    all_attributes,
    random_attributes,
    random_jitter,
    render,
    to_tensor,
)


def zero_shot_prompts(attribute: str) -> list[str]:
    """One prompt per value of `attribute`, naming only that attribute ("a red shape", "a circle", ...)."""
    return [describe({attribute: value}) for value in VOCABULARY[attribute]]


def fresh_renders(seed: int, count: int, image_size: int = 64) -> tuple[torch.Tensor, list[Attributes]]:
    """`count` random clean renders from every combination (held-out pairs included)."""
    generator = torch.Generator().manual_seed(seed)
    attrs = [random_attributes(generator, heldout_ok=True) for _ in range(count)]
    images = torch.stack([to_tensor(render(a, image_size, random_jitter(generator))) for a in attrs])
    return images, attrs


def zero_shot_accuracy(clip, images: torch.Tensor, attrs: list[Attributes]) -> dict[str, float]:
    """{attribute: share of images whose best-matching value prompt is the true value}."""
    z = clip.embed_images(images)
    out = {}
    for attribute in ATTRIBUTE_NAMES:
        values = VOCABULARY[attribute]
        predicted = (z @ clip.embed_texts(zero_shot_prompts(attribute)).T).argmax(dim=1).cpu()
        truth = torch.tensor([values.index(getattr(a, attribute)) for a in attrs])
        out[attribute] = float((predicted == truth).float().mean())
    return out


def caption_cosines(clip, images: torch.Tensor, attrs: list[Attributes], seed: int = 0) -> dict[str, float]:
    """Mean cosine of each image with a caption of itself (matching) and with other images' captions."""
    generator = torch.Generator().manual_seed(seed)
    texts = [caption(a, generator) for a in attrs]
    full = [describe(a.as_dict()) for a in attrs]
    z = clip.embed_images(images)
    out = {}
    for key, prompts in (("caption", texts), ("full_caption", full)):
        sim = z @ clip.embed_texts(prompts).T
        n = len(attrs)
        off = ~torch.eye(n, dtype=torch.bool)
        same = torch.tensor([[a == b for b in attrs] for a in attrs])
        out[f"{key}_matching"] = float(sim.diagonal().mean())
        out[f"{key}_mismatched"] = float(sim[off & ~same].mean())
    return out


def _targets(attrs: list[Attributes]) -> torch.Tensor:
    return torch.tensor([[VOCABULARY[n].index(getattr(a, n)) for n in ATTRIBUTE_NAMES] for a in attrs])


def _read(mlp: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """MLP logits -> predicted value index per attribute, (N, 5)."""
    logits = mlp(z)
    sizes = [len(VOCABULARY[n]) for n in ATTRIBUTE_NAMES]
    return torch.stack([part.argmax(dim=1) for part in logits.split(sizes, dim=1)], dim=1)


def pseudo_text(z: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """normalise(normalise(z) + alpha * e / |e|), e ~ N(0, I): the paper's pseudo-text noise."""
    e = torch.randn(z.shape, generator=generator)
    return F.normalize(F.normalize(z, dim=-1) + alpha * F.normalize(e, dim=-1), dim=-1)


def transfer_check(clip, alphas=(0.0, 0.25, 0.5), train_images: int = 6000, image_size: int = 32,
                   steps: int = 1500, seed: int = 0) -> dict[str, dict[str, float]]:
    """{f"alpha={a}": {"in_distribution_all": ..., "heldout_all": ..., "heldout_shape_colour": ...}}."""
    data = ShapesImages(seed=seed + 17, count=train_images, image_size=image_size)
    images = torch.stack([data[i] for i in range(len(data))])
    z_images = clip.embed_images(images).cpu()
    y_images = _targets([data.attributes(i) for i in range(len(data))])
    sets = {
        "in_distribution": [a for a in all_attributes() if not a.is_heldout],
        "heldout": [a for a in all_attributes() if a.is_heldout],
    }
    text_z = {k: clip.embed_texts([describe(a.as_dict()) for a in v]).cpu() for k, v in sets.items()}
    sizes = [len(VOCABULARY[n]) for n in ATTRIBUTE_NAMES]
    results = {}
    for alpha in alphas:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        mlp = torch.nn.Sequential(torch.nn.Linear(z_images.shape[1], 256), torch.nn.GELU(),
                                  torch.nn.Linear(256, sum(sizes)))
        optimizer = torch.optim.Adam(mlp.parameters(), lr=2e-3)
        for _ in range(steps):
            idx = torch.randint(len(z_images), (256,), generator=generator)
            logits = mlp(pseudo_text(z_images[idx], alpha, generator)).split(sizes, dim=1)
            loss = sum(F.cross_entropy(part, y_images[idx, k]) for k, part in enumerate(logits))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        row = {}
        with torch.no_grad():
            for key, attrs in sets.items():
                correct = _read(mlp, text_z[key]) == _targets(attrs)
                row[f"{key}_all"] = float(correct.all(dim=1).float().mean())
                row[f"{key}_shape_colour"] = float(correct[:, :2].all(dim=1).float().mean())
        results[f"alpha={alpha}"] = row
    return results


def main(argv: list[str] | None = None) -> None:
    from clipvqd.clip import load_clip

    parser = argparse.ArgumentParser(description="Measure a shapes CLIP: zero-shot, cosines, transfer.")
    parser.add_argument("--weights", default="", help="a tiny CLIP .safetensors (default: the shipped one)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--no-transfer", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    clip = load_clip("shapes", args.weights)
    images, attrs = fresh_renders(args.seed, args.count)
    report = {"clip": clip.name, "zero_shot_64px": zero_shot_accuracy(clip, images, attrs)}
    images32, attrs32 = fresh_renders(args.seed + 1, args.count, image_size=32)
    report["zero_shot_32px"] = zero_shot_accuracy(clip, images32, attrs32)
    report["cosines"] = caption_cosines(clip, images[:500], attrs[:500])
    if not args.no_transfer:
        report["transfer"] = transfer_check(clip)
    report["wall_s"] = round(time.time() - start, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
