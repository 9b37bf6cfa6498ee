"""One tokenizer experiment on the shapes world, outside the CLI.

Trains a GumbelVQGAN on the 5,000 shapes training images (data seed 0, 32 px)
with the library's own quantiser schedule and losses, then judges argmax-code
reconstructions of fresh renders with vq_quality.py's judge_reconstructions. Each
row of the tokenizer experiment table in RESULTS.md is one call, e.g.

    python examples/benchmarks/vq_experiment.py --name soft05_K1024 --loss l2 --decay \\
        --soft-fraction 0.5 --tau-end 0.1 --codebook 1024 --dim 64

Appends one JSON line to --out (default vq_experiments.jsonl). Two runs side
by side at --threads 1 each keep a 2-core machine busy; compare runs at equal
steps, not equal wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clipvqd.shapes.dataset import ShapesImages
from clipvqd.training import lr_factor
from clipvqd.vqgan import GumbelVQGAN, VQGANConfig, codebook_stats, quantizer_schedule
from clipvqd.vqgan_loss import edge_l2_loss, l1_loss, l2_loss
from vq_quality import FRESH_SEED, judge_reconstructions  # this folder's sibling script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--decay", action="store_true", help="cosine lr decay to 0.1x (else constant)")
    p.add_argument("--loss", choices=("l1", "l2"), default="l1")
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--mult", default="1,2,2")
    p.add_argument("--tau-start", type=float, default=1.0)
    p.add_argument("--tau-end", type=float, default=0.3)
    p.add_argument("--edge", type=float, default=0.0, help="weight of the edge-weighted squared error")
    p.add_argument("--soft-fraction", type=float, default=0.0)
    p.add_argument("--noquant", action="store_true", help="decode softmax(logits) always: no quantiser (a ceiling)")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--eval", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="vq_experiments.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    data = ShapesImages(0, a.images, 32)
    x_all = torch.stack([data[i] for i in range(len(data))])
    torch.manual_seed(0)
    cfg = VQGANConfig(base_channels=a.base, channel_mult=tuple(int(m) for m in a.mult.split(",")),
                      num_res_blocks=1, attn_resolutions=(), image_size=32, codebook_size=a.codebook,
                      embed_dim=a.dim, tau_start=a.tau_start, tau_end=a.tau_end, gumbel_noise=0.0,
                      soft_fraction=a.soft_fraction)
    model = GumbelVQGAN(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(1)
    recon_loss = l2_loss if a.loss == "l2" else l1_loss
    started = time.perf_counter()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = a.lr * (lr_factor(step, 0, a.steps, 0.1) if a.decay else 1.0)
        x = x_all[torch.randint(0, len(x_all), (a.batch,), generator=gen)]
        tau, hard = quantizer_schedule(step, a.steps, a.tau_start, a.tau_end, a.soft_fraction)
        if a.noquant:  # the soft path at tau 1 (cfg.gumbel_noise is 0): decodes softmax(logits)
            recon, kl = model(x, 1.0, gen, hard=False)[0], 0.0
        else:
            recon, info = model(x, tau, gen, hard=hard)
            kl = info["kl"]
        loss = recon_loss(recon, x) + a.edge * edge_l2_loss(recon, x) + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.5f} {time.perf_counter() - started:.0f} s", flush=True)
    train_s = time.perf_counter() - started

    model.eval()
    fresh = ShapesImages(FRESH_SEED, a.eval, 32)
    originals = torch.stack([fresh[i] for i in range(a.eval)])
    with torch.no_grad():
        codes = model.encode(originals)
        if a.noquant:
            recon = model(originals, 1.0, gen, hard=False)[0]
        else:
            recon = model.decode(codes)
    recon = recon.clamp(-1, 1)
    usage, perplexity = codebook_stats(codes, a.codebook)
    result = {"name": a.name, **judge_reconstructions(fresh, originals, recon),
              "usage": usage, "perplexity": perplexity, "train_s": train_s, "args": vars(a)}
    print(json.dumps(result))
    with open(a.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
