"""Train the tiny shapes CLIP contrastively, from scratch, seeded, on the CPU.

    python -m clipvqd.shapes.train_clip --out clipvqd/shapes/tiny_clip.safetensors

(defaults: --steps 2400 --seed 0 --clip-image-size 32 --threads 1) reproduces
the shipped weights: about 12 minutes on one idle CPU core, 30 on a busy
shared machine. Renders are made at 32 px and fed to a 32 px ResNet.

Each step draws a fresh batch of (image, caption) pairs from every attribute
combination (held-out pairs included: this stands in for web-scale CLIP
pretraining, which has seen everything), and minimises the symmetric InfoNCE
loss. The architecture follows the probe in SHAPES.md: open_clip's
ModifiedResNet image tower (layers (1,1,1,1), width 16) and a narrow text
transformer (width 64). With one thread, the result depends only on the seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from clipvqd.clip import Tokenizer, build_model, save_tiny_clip
from clipvqd.shapes.captions import caption
from clipvqd.shapes.world import random_attributes, random_jitter, render

# The shipped tiny CLIP's configuration (open_clip layout, plus our preprocessing).
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}
DATA_IMAGE_SIZE = 32  # renders are made at 32 px and upsampled to the CLIP's input size


def make_batch(generator: torch.Generator, batch_size: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """Fresh (images uint8 (B, H, W, 3) as a float tensor in [-1, 1] NCHW, captions)."""
    images, texts = [], []
    for _ in range(batch_size):
        attrs = random_attributes(generator, heldout_ok=True)
        images.append(render(attrs, image_size, random_jitter(generator)))
        texts.append(caption(attrs, generator))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, texts


def _preprocess(x: torch.Tensor, config: dict) -> torch.Tensor:
    """Same transform as clipvqd.clip.Clip.preprocess (resize, then mean/std)."""
    size = config["vision_cfg"]["image_size"]
    x = (x + 1.0) / 2.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(config["preprocess_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["preprocess_cfg"]["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def train(steps: int, seed: int, batch_size: int = 128, lr: float = 1e-3, warmup: int = 100,
          log_every: int = 100, config: dict | None = None) -> torch.nn.Module:
    """Train and return the model (eval mode). Deterministic given the seed (on one thread)."""
    config = config or TINY_CLIP_CONFIG
    torch.manual_seed(seed)
    model = build_model(config)
    tokenizer = Tokenizer(config["text_cfg"]["context_length"])
    generator = torch.Generator().manual_seed(seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    model.train()
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x, texts = make_batch(generator, batch_size, DATA_IMAGE_SIZE)
        image_features = model.encode_image(_preprocess(x, config), normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.t()
        labels = torch.arange(batch_size)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(json.dumps({"step": step, "loss": round(float(loss.detach()), 4),
                              "logit_scale": round(float(model.logit_scale.exp()), 2),
                              "elapsed_s": round(time.time() - start, 1)}), flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-image-size", type=int, default=TINY_CLIP_CONFIG["vision_cfg"]["image_size"],
                        help="the CLIP's input size (a multiple of 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps it reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    config = copy.deepcopy(TINY_CLIP_CONFIG)
    config["vision_cfg"]["image_size"] = args.clip_image_size
    model = train(args.steps, args.seed, config=config)
    save_tiny_clip(model, config, args.out)
    print(json.dumps({"saved": args.out, "steps": args.steps, "seed": args.seed,
                      "wall_s": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
