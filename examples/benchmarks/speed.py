"""Speed benchmark: our sampler against the diffusers VQ-Diffusion sampling loop.

Run from the repository root (diffusers is the bench-only extra ``.[bench]``)::

    python examples/benchmarks/speed.py --out examples/benchmarks/speed.json

What one run measures, side by side and in the same process:

* images/s of token sampling (no VQ decode on either side: both produce token
  grids only) for ``ours`` = ``clipvqd.sampling.sample`` over a random-init
  ``clipvqd.transformer.Denoiser`` and ``diffusers`` = the loop of diffusers'
  ``VQDiffusionPipeline.__call__`` (guidance as it does it, its ``truncate``
  with a full sort, ``VQDiffusionScheduler.step``) over a random-init discrete
  ``Transformer2DModel`` with the same depth, width, heads, grid and codebook;
  a one-token context (B, 1, 512) stands in for the CLIP vector and a second
  one for the pipeline's learned unconditional embedding;
* the share of sampling time spent inside the transformer forward (a timer
  wraps the denoiser callable on both sides);
* FLOPs of one forward, counted from the shapes that actually flow: every
  ``nn.Linear`` call adds 2 * rows * in * out (a forward hook), every
  attention adds 4 * B * Lq * Lk * D (QK^T and AV); embeddings, norms,
  softmax and elementwise work are not counted. Achieved GFLOP/s = forward
  FLOPs * forwards / time inside the forward;
* this machine's matmul peak (best of a square-matmul loop, fp32 and bf16);
* optionally (``--training``) train-vq / train-diffusion steps/s and tokenize
  images/s of the shapes example, and (``--paper-train``) a paper-size
  denoiser training step.

Each loop is the real 100-step (or 25-step) loop, timed over its first n steps
(``--tiny-steps``, ``--small-steps``, ``--paper-steps``; the timer raises
:class:`StopSampling` at forward n+1) and scaled to all its steps: every step
has the same forward shape and the same guidance / truncation / posterior work.
Each configuration runs ``--repeats`` times with the implementations
interleaved, and the fastest repeat counts (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipvqd.allocator import keep_freed_memory
from clipvqd.diffusion import Schedule
from clipvqd.sampling import sample
from clipvqd.transformer import Denoiser, DenoiserConfig, LinearMLP, SelfAttention

COND_DIM = 512  # the CLIP vector
TIMESTEPS = 100
TRUNCATION = 0.9


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    dim: int
    heads: int
    grid: int
    classes: int
    batch: int  # images per sampling call
    steps_run: int  # steps timed per loop (the loop is cut there and the time scaled to all its steps)


SIZES = {
    "tiny": Size("tiny", 4, 128, 4, 8, 256, 16, 100),
    "small": Size("small", 8, 256, 8, 8, 1024, 16, 100),
    "paper": Size("paper", 24, 512, 16, 16, 4096, 2, 4),
}


# ----------------------------------------------------------------------------- timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StopSampling(Exception):
    """Raised by :class:`Timed` when a sampling loop has run its allowed number of steps."""


class Timed:
    """Wraps a callable and accumulates the wall time spent inside it.

    With ``max_calls`` the (n+1)-th call raises :class:`StopSampling` before doing
    anything, so a loop of ``steps`` steps can be cut after its first n steps.
    """

    def __init__(self, fn, device: torch.device, max_calls: int | None = None):
        self.fn, self.device, self.max_calls = fn, device, max_calls
        self.seconds, self.calls = 0.0, 0

    def __call__(self, *args, **kwargs):
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise StopSampling
        synchronize(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def autocast_for(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best achieved GFLOP/s of a square matmul loop (sizes 1024-4096, and 8192 on a GPU; best repeat)."""
    best = 0.0
    for n in (1024, 2048, 4096) + ((8192,) if device.type == "cuda" else ()):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up
        deadline = time.perf_counter() + seconds / 4
        while time.perf_counter() < deadline:
            synchronize(device)
            start = time.perf_counter()
            reps = 4 if device.type == "cuda" else 1
            for _ in range(reps):
                torch.mm(a, b)
            synchronize(device)
            best = max(best, reps * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


# ----------------------------------------------------------------------------- FLOP counting


def count_flops(model: nn.Module, call, module_flops) -> int:
    """FLOPs of ``call()``: 2*rows*in*out per nn.Linear call + ``module_flops(module, args, kwargs)``
    for the modules whose matmuls no nn.Linear call shows (attention, an MLP calling addmm itself)."""
    total = 0

    def linear_hook(module, args, _out):
        nonlocal total
        x = args[0]
        total += 2 * (x.numel() // module.in_features) * module.in_features * module.out_features

    def module_hook(module, args, kwargs, _out):
        nonlocal total
        total += module_flops(module, args, kwargs)

    handles = [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(module_hook, with_kwargs=True) for m in model.modules()
                if module_flops(m, None, None) is not None]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return total


def ours_module_flops(module, args, kwargs):
    """QK^T and AV of our attention; fc1 and fc2 of LinearMLP (it calls addmm, not its nn.Linear children)."""
    if not isinstance(module, (SelfAttention, LinearMLP)):
        return None
    if args is None:
        return 0
    B, L, D = args[0].shape
    if isinstance(module, LinearMLP):
        return 2 * 2 * B * L * D * module.fc1.out_features
    return 4 * B * L * L * D


def diffusers_attention_flops(module, args, kwargs):
    from diffusers.models.attention_processor import Attention

    if not isinstance(module, Attention):
        return None
    if args is None:
        return 0
    hidden = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states")
    B, Lq, _ = hidden.shape
    Lk = Lq if context is None else context.shape[1]
    return 4 * B * Lq * Lk * module.inner_dim


# ----------------------------------------------------------------------------- the two samplers


def make_ours(size: Size, device: torch.device):
    cfg = DenoiserConfig(num_classes=size.classes, height=size.grid, width=size.grid, layers=size.layers,
                         dim=size.dim, heads=size.heads, mlp="linear", mlp_ratio=4, cond_dim=COND_DIM,
                         timesteps=TIMESTEPS)
    torch.manual_seed(0)
    return Denoiser(cfg).to(device).eval()


def make_diffusers(size: Size, device: torch.device):
    """Random-init discrete Transformer2DModel as in microsoft/vq-diffusion-ithq, resized."""
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    return Transformer2DModel(
        num_attention_heads=size.heads, attention_head_dim=size.dim // size.heads, num_layers=size.layers,
        cross_attention_dim=COND_DIM, sample_size=size.grid, num_vector_embeds=size.classes + 1,
        activation_fn="geglu-approximate", attention_bias=True, num_embeds_ada_norm=TIMESTEPS,
        norm_type="ada_norm", dropout=0.0,
    ).to(device).eval()


def run_ours(model: Denoiser, size: Size, batch: int, steps: int, guidance: float, device, dtype: str,
             timer: Timed) -> torch.Tensor:
    """clipvqd.sampling.sample with ``timer`` (the timed model) as the denoiser."""
    schedule = Schedule(size.classes, timesteps=TIMESTEPS).to(device, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    cond = F.normalize(torch.randn(batch, COND_DIM, generator=gen, device=device), dim=-1)
    with autocast_for(device, dtype):
        return sample(timer, schedule, cond, size.grid * size.grid, steps=steps, guidance=guidance,
                      truncation=TRUNCATION, generator=gen, null_cond=model.null_condition(1)[0])


def diffusers_truncate(log_p_x_0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
    """The same operations as ``VQDiffusionPipeline.truncate`` (diffusers 0.42,
    pipelines/deprecated/vq_diffusion/pipeline_vq_diffusion.py): a full descending
    sort over the codebook, cumulative sum, the shifted keep mask scattered back
    through ``argsort`` of the sort indices, and -inf at the dropped classes.
    (Importing the pipeline module needs ``transformers``, which is not a dependency.)"""
    sorted_log_p, indices = torch.sort(log_p_x_0, 1, descending=True)
    keep = sorted_log_p.exp().cumsum(dim=1) < truncation_rate
    keep = torch.cat((torch.ones_like(keep[:, :1, :]), keep), dim=1)[:, :-1, :]
    keep = keep.gather(1, indices.argsort(1))
    out = log_p_x_0.clone()
    out[~keep] = -torch.inf
    return out


def run_diffusers(transformer, size: Size, batch: int, steps: int, guidance: float, device, dtype: str,
                  timer: Timed) -> torch.Tensor:
    """The sampling loop of ``VQDiffusionPipeline.__call__`` without the text encoder and VQ-VAE decode."""
    from diffusers import VQDiffusionScheduler

    scheduler = VQDiffusionScheduler(num_vec_classes=size.classes + 1, num_train_timesteps=TIMESTEPS)
    gen = torch.Generator(device=device).manual_seed(0)
    model_dtype = next(transformer.parameters()).dtype
    cond = F.normalize(torch.randn(batch, 1, COND_DIM, generator=gen, device=device), dim=-1)
    uncond = F.normalize(torch.randn(1, 1, COND_DIM, generator=gen, device=device), dim=-1).expand(batch, 1, -1)
    cfg = guidance > 1.0
    embeds = (torch.cat([uncond, cond]) if cfg else cond).to(model_dtype)
    scheduler.set_timesteps(steps, device=device)
    mask = transformer.config.num_vector_embeds - 1
    latents = torch.full((batch, transformer.num_latent_pixels), mask, device=device)
    with torch.no_grad(), autocast_for(device, dtype):
        for t in scheduler.timesteps.to(device):
            model_input = torch.cat([latents] * 2) if cfg else latents
            out = timer(model_input, encoder_hidden_states=embeds, timestep=t).sample
            if cfg:
                out_uncond, out_text = out.chunk(2)
                out = out_uncond + guidance * (out_text - out_uncond)
                out -= torch.logsumexp(out, dim=1, keepdim=True)
            out = diffusers_truncate(out, TRUNCATION)
            out = out.clamp(-70)
            latents = scheduler.step(out, timestep=t, sample=latents, generator=gen).prev_sample
    return latents


def time_run(impl: str, model, size: Size, dtype: str, guidance: float, steps: int, device, batch: int,
             steps_run: int) -> tuple[float, float]:
    """(wall seconds, seconds inside the forward) of the first ``steps_run`` steps of a ``steps``-step loop."""
    timer = Timed(model, device, max_calls=steps_run if steps_run < steps else None)
    runner = run_ours if impl == "ours" else run_diffusers
    synchronize(device)
    start = time.perf_counter()
    try:
        tokens = runner(model, size, batch, steps, guidance, device, dtype, timer)
        assert tokens.shape == (batch, size.grid * size.grid) and int(tokens.max()) < size.classes
    except StopSampling:
        pass
    synchronize(device)
    elapsed = time.perf_counter() - start
    assert timer.calls == steps_run
    return elapsed, timer.seconds


def record(impl: str, size: Size, dtype: str, guidance: float, steps: int, batch: int, steps_run: int,
           elapsed: float, forward_s: float) -> dict:
    """Scale a ``steps_run``-step timing to images/s of ``steps``-step sampling."""
    per_image = elapsed / batch * steps / steps_run
    return {
        "impl": impl, "size": size.name, "dtype": dtype, "guidance": guidance, "steps": steps, "batch": batch,
        "steps_run": steps_run, "seconds_run": elapsed, "images_per_s": 1 / per_image, "s_per_image": per_image,
        "forward_share": forward_s / elapsed, "forward_s_per_call": forward_s / steps_run,
    }


def forward_flops(impl: str, model, size: Size, batch: int, guidance: float, device) -> int:
    rows = batch * (2 if guidance > 1 else 1)
    L = size.grid * size.grid
    tokens = torch.full((rows, L), size.classes, device=device)
    if impl == "ours":
        cond = torch.randn(rows, COND_DIM, device=device)
        t = torch.full((rows,), TIMESTEPS, device=device)
        return count_flops(model, lambda: model(tokens, t, cond), ours_module_flops)
    context = torch.randn(rows, 1, COND_DIM, device=device, dtype=next(model.parameters()).dtype)
    t = torch.tensor(TIMESTEPS - 1, device=device)
    return count_flops(model, lambda: model(tokens, encoder_hidden_states=context, timestep=t),
                       diffusers_attention_flops)


def speed(sizes, dtypes, guidances, device, ours_steps, paper_batch, paper_steps, diffusers_bf16,
          repeats: int, steps_run: dict) -> list[dict]:
    """Every (size, dtype, guidance): diffusers at 100 steps and ours at each of ``ours_steps``, run
    interleaved ``repeats`` times (the best repeat of each counts: the machine is shared)."""
    rows = []
    for name in sizes:
        size = SIZES[name]
        if name == "paper":
            size = Size(**{**size.__dict__, "batch": paper_batch, "steps_run": paper_steps})
        elif name in steps_run:
            size = Size(**{**size.__dict__, "steps_run": steps_run[name]})
        ours = make_ours(size, device)
        base = make_diffusers(size, device)
        for dtype in dtypes:
            weights = dtype == "bf16" and diffusers_bf16 == "weights"
            theirs = base.to(torch.bfloat16) if weights else base.float()
            for guidance in guidances:
                flops = {"ours": forward_flops("ours", ours, size, size.batch, guidance, device),
                         "diffusers": forward_flops("diffusers", theirs, size, size.batch, guidance, device)}
                plan = [("diffusers", theirs, "fp32" if weights else dtype, 100)]
                plan += [("ours", ours, dtype, s) for s in ours_steps]
                best = {}
                for impl, model, run_dtype, steps in plan:  # warm-up: one step each
                    time_run(impl, model, size, run_dtype, guidance, steps, device, size.batch, 1)
                for _ in range(repeats):
                    for impl, model, run_dtype, steps in plan:
                        n = min(steps, size.steps_run)
                        elapsed, fwd = time_run(impl, model, size, run_dtype, guidance, steps, device, size.batch, n)
                        if (impl, steps) not in best or elapsed < best[impl, steps][0]:
                            best[impl, steps] = (elapsed, fwd, n)
                for impl, model, run_dtype, steps in plan:
                    elapsed, fwd, n = best[impl, steps]
                    r = record(impl, size, dtype, guidance, steps, size.batch, n, elapsed, fwd)
                    r["repeats"] = repeats
                    if impl == "diffusers" and weights:
                        r["bf16_mode"] = "weights"
                    r["forward_gflop"] = flops[impl] / 1e9
                    r["forward_gflops_per_s"] = flops[impl] / r["forward_s_per_call"] / 1e9
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    return rows


# ----------------------------------------------------------------------------- training and tokenize


def cli_stage_rates(workdir: Path, vq_steps: int, diffusion_steps: int, count: int | None) -> dict:
    """steps/s of train-vq and train-diffusion and images/s of tokenize, as the stages report them,
    on a fresh `clipvqd init --example shapes` project (defaults except the step counts)."""
    from clipvqd.config import load_config
    from clipvqd.project import Project
    from clipvqd.stages import tokenize, train_diffusion, train_vq

    project_dir = workdir / "shapes"
    cli = shutil.which("clipvqd") or str(Path(sys.executable).parent / "clipvqd")
    subprocess.run([cli, "init", str(project_dir), "--example", "shapes"], check=True, capture_output=True)
    path = project_dir / "clipvqd.toml"
    overrides = [f"train_vq.steps={vq_steps}", f"train_diffusion.steps={diffusion_steps}"]
    if count:
        overrides.append(f"data.count={count}")
    config = load_config(path, overrides)
    project = Project.from_file(path)
    out = {"overrides": overrides}
    out["train_vq"] = train_vq.run(config, project)
    clip_file = Path(__file__).resolve().parents[2] / "clipvqd" / "shapes" / "tiny_clip.safetensors"
    if not clip_file.exists():
        out["tokenize"] = {"skipped": f"{clip_file} not found"}
        return out
    out["tokenize"] = tokenize.run(config, project)
    out["train_diffusion"] = train_diffusion.run(config, project)
    return out


def paper_training_steps(device: torch.device, dtype: str, batch: int, steps: int, mlp: str) -> dict:
    """Steps/s of one training step (forward, VLB loss, backward, AdamW) of the paper-size denoiser."""
    from clipvqd.diffusion import vlb_loss

    cfg = DenoiserConfig(mlp=mlp)  # the paper size: K=4096, 16x16, 24 x 512, 16 heads, cond 512, T=100
    torch.manual_seed(0)
    model = Denoiser(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = Schedule(cfg.num_classes, timesteps=cfg.timesteps).to(device, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randint(0, cfg.num_classes, (batch, cfg.seq_len), generator=gen, device=device)
    cond = F.normalize(torch.randn(batch, cfg.cond_dim, generator=gen, device=device), dim=-1)

    def step():
        t = torch.randint(1, cfg.timesteps + 1, (batch,), generator=gen, device=device)
        x_t = schedule.q_sample(x0, t, gen)
        with autocast_for(device, dtype):
            log_x0 = model(x_t, t, cond)
        loss = vlb_loss(log_x0.float(), x0, x_t, t, schedule)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"mlp": mlp, "dtype": dtype, "batch": batch, "steps": steps, "steps_per_s": steps / elapsed,
            "samples_per_s": batch * steps / elapsed}


# ----------------------------------------------------------------------------- report


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux) and whether it has AMX or AVX512-BF16."""
    name = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        text = open("/proc/cpuinfo").read()
        names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        name = names[0] if names else name
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        extras = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags]
        name += f" ({', '.join(extras) if extras else 'no native bf16'})"
    return name


def machine(default_malloc: bool = False) -> dict:
    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "malloc": "glibc default" if default_malloc else "keep freed memory (as the CLI)"}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if os.path.exists("/proc/loadavg"):
        info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"Date {m['date_utc']}; torch {m['torch']}, diffusers {m.get('diffusers')}; device "
                 f"{result['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}; CPU {m.get('cpu')}; "
                 f"threads {m['threads']}; malloc: {m.get('malloc')}; "
                 f"load average before {m.get('loadavg')}, after {result.get('loadavg_after')}.")
    peak = result.get("peak_gflops", {})
    if peak:
        lines.append("\nMeasured matmul peak: " + ", ".join(f"{d} {v:.0f} GFLOP/s" for d, v in peak.items()) + ".\n")
    rows = result.get("speed", [])
    if rows:
        lines.append("| size | dtype | guidance | impl | steps | batch | images/s | s/image | x diffusers | "
                     "forward share | forward GFLOP | GFLOP/s | % of peak |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ref = next(x for x in rows if x["impl"] == "diffusers" and x["size"] == r["size"]
                       and x["dtype"] == r["dtype"] and x["guidance"] == r["guidance"])
            pk = peak.get(r["dtype"], float("nan"))
            scaled = "" if r["steps_run"] == r["steps"] else f" (first {r['steps_run']} timed)"
            impl = r["impl"] + (" (bf16 weights)" if r.get("bf16_mode") == "weights" else "")
            lines.append(
                f"| {r['size']} | {r['dtype']} | {r['guidance']:g} | {impl} | {r['steps']}{scaled} | {r['batch']} "
                f"| {r['images_per_s']:.3g} | {r['s_per_image']:.3g} | {r['images_per_s'] / ref['images_per_s']:.2f} "
                f"| {100 * r['forward_share']:.0f}% | {r['forward_gflop']:.2f} | {r['forward_gflops_per_s']:.0f} "
                f"| {100 * r['forward_gflops_per_s'] / pk:.0f}% |")
    stages = result.get("stages")
    if stages:
        lines.append(f"\nShapes example stages (`{' '.join(stages['overrides'])}`):\n")
        lines.append("| stage | rate |\n|---|---|")
        for name, key in (("train-vq", "steps/s"), ("tokenize", "images/s"), ("train-diffusion", "steps/s")):
            s = stages.get(name.replace("-", "_"), {})
            lines.append(f"| {name} | {s[key]:.3g} {key} |" if key in s else f"| {name} | {s.get('skipped', '-')} |")
    train = result.get("paper_train")
    if train:
        lines.append("\nPaper-size denoiser training step (forward + VLB loss + backward + AdamW):\n")
        lines.append("| mlp | dtype | batch | steps | steps/s | samples/s |\n|---|---|---|---|---|---|")
        for r in train:
            lines.append(f"| {r['mlp']} | {r['dtype']} | {r['batch']} | {r['steps']} | {r['steps_per_s']:.3g} "
                         f"| {r['samples_per_s']:.3g} |")
    return "\n".join(lines) + "\n"


def profile_ours(spec: str, device: torch.device, steps: int = 10, rows: int = 25) -> str:
    """torch.profiler's table (top ``rows`` ops by self CPU time) of our loop's first ``steps`` steps.

    ``spec`` is size:dtype:guidance, e.g. ``small:bf16:3``; one untimed warm-up loop runs first."""
    from torch.profiler import ProfilerActivity, profile

    name, dtype, guidance = spec.split(":")
    size = SIZES[name]
    model = make_ours(size, device)
    for _ in range(2):  # warm-up, then the profiled run
        timer = Timed(model, device, max_calls=steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            try:
                run_ours(model, size, size.batch, 100, float(guidance), device, dtype, timer)
            except StopSampling:
                pass
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--sizes", default="tiny,small,paper")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--guidance", default="1,3")
    p.add_argument("--ours-steps", default="100,25", help="step counts of our sampler (diffusers always runs 100)")
    p.add_argument("--paper-batch", type=int, default=2)
    p.add_argument("--paper-steps", type=int, default=2, help="steps run per repeat at the paper size")
    p.add_argument("--tiny-steps", type=int, default=10, help="steps run per repeat at the tiny size")
    p.add_argument("--small-steps", type=int, default=6, help="steps run per repeat at the small size")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best counts")
    p.add_argument("--batch", type=int, default=None, help="override the tiny/small batch (16)")
    p.add_argument("--diffusers-bf16", choices=("autocast", "weights"), default="autocast",
                   help="bf16 for diffusers: autocast (as ours) or bf16 weights (the pipeline's torch_dtype)")
    p.add_argument("--no-speed", action="store_true", help="skip the sampler comparison")
    p.add_argument("--peak-seconds", type=float, default=3.0)
    p.add_argument("--training", action="store_true", help="also time the shapes example's stages")
    p.add_argument("--vq-steps", type=int, default=40)
    p.add_argument("--diffusion-steps", type=int, default=60)
    p.add_argument("--count", type=int, default=None, help="data.count for the stage timings (default: example's)")
    p.add_argument("--paper-train", default="", help="e.g. 'bf16:conv:16:10' = dtype:mlp:batch:steps, comma-separated")
    p.add_argument("--profile", default="", help="only print torch.profiler's table of our loop, e.g. 'small:bf16:3'")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default: keep freed memory, as the clipvqd CLI does)")
    args = p.parse_args(argv)

    if not args.default_malloc:
        keep_freed_memory()  # the CLI's allocator policy, for both samplers (one process)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.batch:
        for k in ("tiny", "small"):
            SIZES[k] = Size(**{**SIZES[k].__dict__, "batch": args.batch})
    if args.profile:
        print(profile_ours(args.profile, device))
        return
    result = {"device": str(device), "machine": machine(args.default_malloc), "argv": sys.argv[1:] if argv is None else argv}
    dtypes = [d for d in args.dtypes.split(",") if d]
    # fp32 always (the reference rate); bf16 only when timed: without native bf16 (an AVX2-only CPU)
    # one 4096^2 bf16 matmul ran for more than 7 minutes on one core (SPEED.md, the Zen 3 machine)
    result["peak_gflops"] = {d: matmul_peak(device, torch.float32 if d == "fp32" else torch.bfloat16,
                                            args.peak_seconds) for d in ("fp32", "bf16") if d == "fp32" or d in dtypes}
    print(json.dumps(result["peak_gflops"]), flush=True)
    if not args.no_speed:
        result["speed"] = speed(args.sizes.split(","), dtypes, [float(g) for g in args.guidance.split(",")], device,
                                [int(s) for s in args.ours_steps.split(",")], args.paper_batch, args.paper_steps,
                                args.diffusers_bf16, args.repeats,
                                {"tiny": args.tiny_steps, "small": args.small_steps})
    if args.paper_train:
        result["paper_train"] = []
        for spec in args.paper_train.split(","):
            dtype, mlp, batch, steps = spec.split(":")
            r = paper_training_steps(device, dtype, int(batch), int(steps), mlp)
            print(json.dumps(r), flush=True)
            result["paper_train"].append(r)
    if args.training:
        with tempfile.TemporaryDirectory() as tmp:
            result["stages"] = cli_stage_rates(Path(tmp), args.vq_steps, args.diffusion_steps, args.count)
    if os.path.exists("/proc/loadavg"):
        result["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    text = markdown(result)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
