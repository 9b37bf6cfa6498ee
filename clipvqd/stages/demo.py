"""`clipvqd demo [DIR]`: the whole language-free pipeline on the built-in
shapes world, sized to finish in about ten minutes on a 2-core laptop CPU
that computes bf16 natively (15-20 minutes on one that does not).

init -> train-vq -> tokenize -> train-diffusion -> finetune-cfg -> eval
(shapes protocol on a fixed subset of in-distribution and held-out prompts,
16 candidates each, reranked by CLIP) -> a contact sheet of prompts beside
their best images. Every stage is the real command's code; rerunning the demo
resumes or skips what is already done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clipvqd.config import Config, load_config
from clipvqd.contact_sheet import contact_sheet
from clipvqd.data import from_uint8
from clipvqd.project import Project
from clipvqd.stages.common import device_of, native_cpu_bf16
from clipvqd.templates import write_project_file

# The demo evaluates this many prompts of each shapes prompt set.
DEMO_PROMPTS = 6
DEMO_SAMPLES = 16
# Budgets that fit the whole run in ten minutes on a 2-core CPU with native bf16 (RESULTS.md,
# "The demo"). The shapes defaults train the tokenizer for 3000 steps, the
# denoiser for 4000 at lr 1e-3, fine-tune for 400 and sample with 100 steps at
# guidance 3 and truncation 0.9.
# The demo trains the tokenizer for 2000 steps (a tokenizer that cannot
# reconstruct a shape leaves the generator unable to draw it: 1000 steps
# reconstructed 71% of fresh renders right, 2000 steps 81-90%) and the denoiser
# for 1500 at lr 4e-3 (in bf16 where the CPU has it natively: see denoiser_precision).
# On the Zen 4 machine, 24 prompts a set, in-distribution: lr 1e-3 scored
# 47-52% after 1800 steps, 2e-3 57%, 3e-3 64%, 4e-3 65%; 4e-3 after 1500 steps
# scored 60%, with the time to spare. It samples with 25 steps (about 4x faster
# than 100; within 6 points of it in the quality benchmark's runs), guides at
# 1.5 (after this short training, 1.5 scored 4-7 points above 3 in-distribution
# on two trainings) and truncates at 0.7 (0-5 points above 0.9, never more than
# 0.3 below, on seven Zen 4 trainings; the long quality run shows no difference). Its short
# guidance fine-tune runs at 1e-4: the defaults' 3e-4 scored
# 6 points lower in-distribution here (12 prompts a set), though not at the
# defaults' longer schedule.
DEMO_OVERRIDES = [
    f"eval.max_prompts={DEMO_PROMPTS}", f"eval.samples_per_prompt={DEMO_SAMPLES}", "eval.protocol=shapes",
    "train_vq.steps=2000", "train_diffusion.steps=1500", "train_diffusion.lr=0.004",
    "finetune_cfg.steps=150", "finetune_cfg.lr=0.0001",
    "sample.steps=25", "sample.guidance=1.5", "sample.truncation=0.7",
]


# Said before a demo whose denoiser will train in fp32 on a CPU (no AMX, no AVX512-BF16), so
# that nobody takes the longer run for a hang. The budget stays: on the AVX2 machines ten minutes
# leave room for half to two thirds of the training, and every cut tried fell below 60% on 12 prompts
# a set (the shipped budget 61%; 1000 denoiser steps at lr 4e-3 48%, at 6e-3 42%; batch 16 35%;
# RESULTS.md, "The demo").
FP32_CPU_NOTE = ("precision: fp32 (this CPU has no native bf16: no AMX or AVX512-BF16): the demo takes "
                 "1.5-3x as long as on one that has it, 15-20 min on a 2-core AVX2 AMD EPYC")


def denoiser_precision(config: Config) -> str:
    """The mixed precision of the demo's denoiser stages (train-diffusion, finetune-cfg, eval).

    The project file's choice, unless it is "no" and the stages will run on a
    CPU with native bf16: then "bf16", which trains the demo's denoiser 1.4x
    faster here (RESULTS.md). The tokenizer keeps the file's choice: bf16
    does not train it faster on the same CPU.
    """
    if config.project.mixed_precision != "no" or device_of(config).type != "cpu":
        return config.project.mixed_precision
    return "bf16" if native_cpu_bf16() else "no"


def precision_note(config: Config, precision: str) -> str | None:
    """The line the demo prints about the denoiser's precision ``precision`` (or None: the file's own choice)."""
    if precision != config.project.mixed_precision:
        return (f"precision: the denoiser trains and samples in {precision} autocast "
                "(this CPU computes it natively); the tokenizer in fp32")
    if precision == "no" and device_of(config).type == "cpu":
        return FP32_CPU_NOTE
    return None


def say(console: Console, line: str) -> None:
    """Print one status line as written: never wrapped at the console's width (a log file's
    is 80 columns), and brackets in a path are text, not rich markup."""
    console.print(escape(line), soft_wrap=True)


def run(directory: Path, console: Console) -> dict:
    from clipvqd.stages import eval as eval_stage, finetune_cfg, tokenize, train_diffusion, train_vq

    directory = Path(directory)
    project_file = directory / "clipvqd.toml"
    if not project_file.exists():
        write_project_file(directory, "shapes")
        say(console, f"init: wrote {project_file} (the shapes world)")
    else:
        say(console, f"init: using the existing {project_file}")
    config = load_config(project_file, DEMO_OVERRIDES)
    precision = denoiser_precision(config)
    denoiser_config = dataclasses.replace(
        config, project=dataclasses.replace(config.project, mixed_precision=precision))
    note = precision_note(config, precision)
    if note:
        say(console, note)
    project = Project.from_file(project_file)
    started = time.perf_counter()

    def stage(name: str, fn, describe, stage_config: Config = config) -> dict:
        t0 = time.perf_counter()
        result = fn(stage_config, project)
        say(console, f"{name}: {describe(result)} ({time.perf_counter() - t0:.0f} s)")
        return result

    stage("train-vq", train_vq.run, lambda r: _trained(
        r, lambda: f"squared error {r['l2']:.4f}, codebook usage {r['codebook usage (last batch)']:.0%}"))
    stage("tokenize", tokenize.run, lambda r: f"{r['images']} images -> {project.tokens}")
    stage("train-diffusion", train_diffusion.run, lambda r: _trained(r, lambda: f"loss {r['loss']:.3f}"), denoiser_config)
    stage("finetune-cfg", finetune_cfg.run, lambda r: _trained(r, lambda: f"loss {r['loss']:.3f}"), denoiser_config)
    result = stage("eval", lambda c, p: eval_stage.run(c, p, name="demo"),
                   lambda r: f"{r.get('images', '?')} images judged, written to {project.eval_dir / 'demo.json'}",
                   denoiser_config)
    sheet = _best_sheet(project, result)
    table = Table(title="clipvqd demo: the shapes world, trained without a single caption")
    table.add_column("measure")
    table.add_column("value", justify="right")
    metrics = json.loads((project.eval_dir / "demo.json").read_text())["metrics"]
    best = f"best of {DEMO_SAMPLES} by CLIP"
    for key in (f"judge in-distribution, {best}: all named", f"judge held-out, {best}: all named",
                "judge in-distribution, all samples: all named", "judge held-out, all samples: all named",
                "CLIP score (cosine, paper), best of n", "FID"):
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:.1%}" if key.startswith("judge") else f"{value:.3f}")
    console.print(table)
    say(console, f"contact sheet: {sheet}")
    say(console, f"total: {time.perf_counter() - started:.0f} s")
    return {"contact sheet": str(sheet), **{k: v for k, v in metrics.items() if k.startswith("judge")}}


def _trained(result: dict, numbers) -> str:
    """A training stage's line: its steps, and its last losses (``numbers()``) unless it had already
    finished (then the stage reports none)."""
    done = "already finished" in result["steps"]
    return f"{result['steps']} steps" + ("" if done else f", {numbers()}")


def _best_sheet(project: Project, result: dict) -> Path:
    """Each prompt beside its four CLIP-best samples."""
    import numpy as np
    from PIL import Image

    from clipvqd.stages.rerank import read_index

    samples = Path(result["samples"])
    rows = read_index(samples)
    bands = []
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        best = sorted((r for r in rows if r["prompt"] == prompt), key=lambda r: -r["clip_score"])[:4]
        pixels = np.stack([np.asarray(Image.open(samples / r["file"]).convert("RGB")) for r in best])
        bands.append((prompt, from_uint8(pixels)))
    path = project.root / "demo-contact-sheet.png"
    contact_sheet(bands, per_row=4).save(path)
    return path
