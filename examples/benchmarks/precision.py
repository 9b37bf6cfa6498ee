"""bf16 autocast against fp32 for training the denoiser on a CPU.

Run from the repository root (nothing else running; the comparison is a ratio
measured in one process, the variants interleaved)::

    python examples/benchmarks/precision.py

Measures, best of ``--repeats`` rounds of ``--steps`` steps each:

* torch's scaled-dot-product attention alone, forward and forward + backward,
  fp32 against bf16 inputs, at the shapes demo denoiser's shape (32 x 4 heads x
  64 tokens x 32) and the paper denoiser's (4 x 16 x 256 x 32);
* one full training step of the shapes denoiser (4 layers x 128, conv MLP,
  K=1024, 8x8 tokens, batch 32: forward, VLB loss, backward, AdamW) in fp32,
  in bf16 autocast as clipvqd runs it (``clipvqd.attention``: attention in fp32
  while training), and in bf16 with torch's own bf16 attention;
* one step of the shapes tokenizer (the shapes example's VQ at 32 px, batch
  16: forward, squared error, backward, Adam) in fp32, in bf16 as clipvqd runs
  it (``clipvqd.vqgan.GroupNorm``: group norms in fp32) and in bf16 with
  torch's own group norm.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
import torch.nn.functional as F

from clipvqd.diffusion import Schedule, vlb_loss
from clipvqd.transformer import Denoiser, DenoiserConfig


def best_ms(fn, steps: int, order: int, rounds: dict) -> None:
    """Append one round's mean ms per call of ``fn`` to ``rounds[order]``."""
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    rounds.setdefault(order, []).append((time.perf_counter() - start) / steps * 1000)


def attention_groups() -> dict:
    """{"attention <shape> <pass>": {"fp32": fn, "bf16": fn}} for two shapes, forward and forward + backward."""
    groups = {}
    for label, shape in (("shapes denoiser 32x4x64x32", (32, 4, 64, 32)), ("paper 4x16x256x32", (4, 16, 256, 32))):
        for backward in (False, True):
            group = groups[f"attention {label} {'fwd+bwd' if backward else 'fwd'}"] = {}
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=backward) for _ in range(3))

                def run(q=q, k=k, v=v, backward=backward):
                    y = F.scaled_dot_product_attention(q, k, v)
                    if backward:
                        y.float().sum().backward()

                group["fp32" if dtype == torch.float32 else "bf16"] = run
    return groups


def training_groups(batch: int = 32) -> dict:
    torch.manual_seed(0)
    K = 1024
    model = Denoiser(DenoiserConfig(K, 8, 8, 4, 128, 4, mlp="conv", mlp_ratio=2, cond_dim=64, timesteps=100))
    schedule = Schedule(K, 100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (batch, 64), generator=gen)
    cond = F.normalize(torch.randn(batch, 64, generator=gen), dim=-1)

    def step(bf16: bool):
        t = torch.randint(1, 101, (batch,), generator=gen)
        x_t = schedule.q_sample(x0, t, gen)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            log_x0 = model(x_t, t, cond)
        vlb_loss(log_x0.float(), x0, x_t, t, schedule)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def torch_bf16_attention():
        with mock.patch("clipvqd.transformer.attention", F.scaled_dot_product_attention):
            step(True)

    return {"shapes denoiser train step (batch 32)": {
        "fp32": lambda: step(False),
        "bf16 (clipvqd: attention in fp32)": lambda: step(True),
        "bf16 (torch's bf16 attention)": torch_bf16_attention,
    }}


def tokenizer_groups(batch: int = 16) -> dict:
    import pathlib
    import tempfile

    from clipvqd.config import load_config
    from clipvqd.models import vq_config
    from clipvqd.templates import write_project_file
    from clipvqd.vqgan import GumbelVQGAN

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(write_project_file(pathlib.Path(tmp) / "p", "shapes"))
    torch.manual_seed(0)
    model = GumbelVQGAN(vq_config(config))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, config.data.image_size, config.data.image_size, generator=gen) * 2 - 1

    def step(bf16: bool):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            recon, _ = model(x, 0.5, gen, hard=True)
        ((recon.float() - x) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def torch_bf16_norms():
        with mock.patch("clipvqd.vqgan.GroupNorm.forward", torch.nn.GroupNorm.forward):
            step(True)

    return {f"shapes tokenizer train step (batch {batch})": {
        "fp32": lambda: step(False),
        "bf16 (clipvqd: group norms in fp32)": lambda: step(True),
        "bf16 (torch's bf16 group norm)": torch_bf16_norms,
    }}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="calls per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, variants interleaved; the best counts")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for title, group in {**attention_groups(), **training_groups(), **tokenizer_groups()}.items():
        rounds: dict = {}
        names = list(group)
        for _ in range(args.repeats):
            for i, name in enumerate(names):
                best_ms(group[name], args.steps, i, rounds)
        base = min(rounds[0])
        print(title)
        for i, name in enumerate(names):
            print(f"    {name:40s} {min(rounds[i]):8.1f} ms   {min(rounds[i]) / base:5.2f}x the {names[0]} time")

if __name__ == "__main__":
    main()
