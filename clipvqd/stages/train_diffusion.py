"""`clipvqd train-diffusion`: learn p(x0 | x_t, CLIP image embedding) from
tokens/ alone (never images, never CLIP, never a caption).

The same loop serves `finetune-cfg` (see finetune_cfg.py), which starts from
diffusion/model.safetensors and drops the condition with probability p.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipvqd import checkpoint
from clipvqd.conditioning import drop_condition, pseudo_text_embedding
from clipvqd.config import Config, config_to_dict
from clipvqd.diffusion import Schedule, TimestepSampler, vlb_loss
from clipvqd.errors import UserError
from clipvqd.models import denoiser_config
from clipvqd.project import Project, StageDir
from clipvqd.stages.common import warn_if_bf16_is_emulated
from clipvqd.stages.tokenize import read_meta
from clipvqd.transformer import Denoiser
from clipvqd.training import (
    EMA, Checkpointer, RunLog, batch_indices, check_finite, lr_factor, make_accelerator, set_lr, shard,
    step_counts_on_cpu, step_generator,
)


@dataclass(frozen=True)
class LoopSettings:
    """What differs between train-diffusion and finetune-cfg."""

    title: str
    stage: StageDir
    steps: int
    batch_size: int
    lr: float
    scale_lr: bool
    warmup_steps: int
    log_every: int
    save_every: int
    drop_prob: float  # 0 for the base training
    init_from: Path | None  # weights to start from (finetune-cfg)
    extra_meta: dict


def load_tokens(config: Config, project: Project) -> tuple[np.ndarray, np.ndarray, dict]:
    """codes (N, L) uint16 and embeddings (N, d) float16, checked against the config and the VQ."""
    folder = project.tokens
    project.require(folder / "meta.json", "tokens")
    meta = read_meta(project)
    if meta["codebook_size"] != config.vq.codebook_size:
        raise UserError(
            f"tokens/ hold codes of a {meta['codebook_size']}-entry codebook but vq.codebook_size = "
            f"{config.vq.codebook_size}: rerun `clipvqd train-vq` and `clipvqd tokenize`, or fix the config"
        )
    if project.vq.model.exists() and checkpoint.file_sha256(project.vq.model) != meta["vq_sha256"]:
        raise UserError("tokens/ were made by another VQ than vq/model.safetensors: rerun `clipvqd tokenize`")
    try:  # allow_pickle=False: a pickle here is refused, never run
        codes = np.load(folder / "codes.npy", allow_pickle=False)
        embeds = np.load(folder / "clip.npy", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"tokens/ holds an unreadable array ({exc}): rerun `clipvqd tokenize`") from None
    if codes.ndim != 2 or codes.shape[1] != meta["grid"][0] * meta["grid"][1]:
        raise UserError(f"tokens/codes.npy holds {codes.shape[-1]} codes per image but meta.json says a "
                        f"{meta['grid'][0]}x{meta['grid'][1]} grid: rerun `clipvqd tokenize`")
    if codes.shape[0] != meta["count"] or embeds.shape[0] != meta["count"]:
        raise UserError("tokens/ is incomplete (array sizes differ from meta.json): rerun `clipvqd tokenize`")
    if codes.dtype.kind not in "iu" or (codes.size and (codes.min() < 0 or codes.max() >= meta["codebook_size"])):
        raise UserError(f"tokens/codes.npy holds {codes.dtype} codes outside 0..{meta['codebook_size'] - 1}: "
                        "it was not written by `clipvqd tokenize` (rerun it)")
    return codes, embeds, meta


def base_settings(config: Config, project: Project) -> LoopSettings:
    td = config.train_diffusion
    return LoopSettings(
        "train-diffusion", project.diffusion, td.steps, td.batch_size, td.lr, td.scale_lr, td.warmup_steps,
        td.log_every, td.save_every, drop_prob=0.0, init_from=None, extra_meta={"cfg_trained": False},
    )


def run(config: Config, project: Project) -> dict:
    return train(config, project, base_settings(config, project))


def train(config: Config, project: Project, s: LoopSettings) -> dict:
    td = config.train_diffusion
    seed = config.project.seed
    # The null condition is trained only by the guidance fine-tune, and there it enters through the
    # condition rather than a module call, so DDP must look for it in the graph.
    acc = make_accelerator(config.project, find_unused_parameters=s.drop_prob > 0)
    warn_if_bf16_is_emulated(config.project.mixed_precision, acc.device)
    codes_np, embeds_np, meta = load_tokens(config, project)
    torch.manual_seed(seed)  # weight init only
    model = Denoiser(denoiser_config(config, tuple(meta["grid"]), meta["embed_dim"]))
    if s.init_from is not None:
        state, init_meta = checkpoint.load_model(s.init_from, "diffusion")
        if init_meta["config"] != asdict(model.cfg):
            raise UserError(f"{s.init_from} was trained with another [transformer] or [vq] configuration: "
                            "rerun `clipvqd train-diffusion` with the current config")
        model.load_state_dict(state)
    model.null_cond.requires_grad_(s.drop_prob > 0)
    schedule = Schedule(config.vq.codebook_size, **_schedule_args(config)).to(acc.device)
    sampler = TimestepSampler(config.diffusion.timesteps)
    global_batch = s.batch_size * config.project.grad_accum * acc.num_processes
    peak_lr = s.lr * global_batch if s.scale_lr else s.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.96), weight_decay=td.weight_decay)
    ema = EMA(model, td.ema_decay) if td.ema_decay > 0 else None

    made_from = {"tokens": (tokens_identity(meta), "other tokens than this run would go on with (tokenize ran since)")}
    if "base_sha256" in s.extra_meta:
        made_from["base_sha256"] = (s.extra_meta["base_sha256"], "another base model than this run would go on "
                                    "with (train-diffusion ran since)")
    ckpt = Checkpointer(s.stage.root, acc, made_from=made_from)
    modules = {"model": model, "sampler": sampler, **({"ema": ema} if ema else {})}
    start = ckpt.resume(modules, {"opt": optimizer}, s.steps, f"{s.title.replace('-', '_')}.steps")
    if start == s.steps and s.stage.model.exists():
        _check_same_tokens(s.stage.model, meta)
    model, optimizer = acc.prepare(model, optimizer)
    step_counts_on_cpu(optimizer)
    if acc.is_main_process and start < s.steps:  # the config of a run that trains (a finished one keeps its own)
        s.stage.root.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(s.stage.config, json.dumps(config_to_dict(config), indent=2))

    mine = shard(len(codes_np), acc.process_index, acc.num_processes)
    codes = torch.from_numpy(codes_np[mine.numpy()].astype(np.int64)).to(acc.device)
    embeds = torch.from_numpy(embeds_np[mine.numpy()].astype(np.float32)).to(acc.device)
    local = torch.arange(len(mine))
    runlog = RunLog(s.stage.log, s.title, s.steps, start, s.log_every, enabled=acc.is_main_process)
    if acc.num_processes > 1:
        firsts = acc.gather(mine[:1].to(acc.device)).tolist()
        runlog.event(f"{acc.num_processes} processes; process i reads items i, i+{acc.num_processes}, ... "
                     f"(first items {firsts}, {len(mine)} each)")
    started = time.perf_counter()
    terms: dict[str, float] = {}
    raw = acc.unwrap_model(model)
    for step in range(start, s.steps):
        lr = peak_lr * lr_factor(step, s.warmup_steps, s.steps)
        set_lr(optimizer, lr)
        for micro in range(config.project.grad_accum):
            idx = batch_indices(local, s.batch_size, seed, step, acc.process_index, micro).to(acc.device)
            g_cpu = step_generator(seed, step, acc.process_index, salt=micro)
            g_dev = step_generator(seed, step, acc.process_index, salt=100 + micro, device=acc.device)
            x0 = codes[idx]
            cond = pseudo_text_embedding(embeds[idx], td.alpha, g_dev)
            if s.drop_prob > 0:
                cond = drop_condition(cond, F.normalize(raw.null_cond, dim=-1), s.drop_prob, g_dev)
            t, pt = sampler.sample(len(idx), g_cpu, acc.device)
            x_t = schedule.q_sample(x0, t, g_dev)
            with acc.accumulate(model):
                with acc.autocast():
                    log_x0 = model(x_t, t, cond)
                out = vlb_loss(log_x0.float(), x0, x_t, t, schedule, _aux_weight(config), pt)
                if config.project.grad_accum > 1:  # a NaN micro-batch would poison the step the last one takes
                    check_finite({"loss": float(out["loss"].detach())}, step + 1, s.stage.root, acc)
                acc.backward(out["loss"])
                if acc.sync_gradients and td.grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), td.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            all_t, all_vlb = acc.gather((t, out["vlb_per_sample"].float()))
            sampler.update(all_t, all_vlb)
        terms = {"loss": float(out["loss"].detach()), "vlb": float(out["vlb"].detach()),
                 "aux": float(out["aux"].detach()), "lr": lr}
        check_finite(terms, step + 1, s.stage.root, acc)
        if ema is not None:
            ema.update(raw)
        runlog.step(step + 1, terms)
        done = step + 1
        if done % s.save_every == 0 or done == s.steps:
            ckpt.save(done, modules, {"opt": optimizer})
    elapsed = time.perf_counter() - started
    if acc.num_processes > 1:  # gradients were averaged, so every replica must hold the same weights
        checksum = torch.stack([p.detach().double().sum() for p in raw.parameters()]).sum().view(1)
        sums = acc.gather(checksum.to(acc.device)).tolist()
        runlog.event(f"replica weight checksums {sums}: {'in sync' if len(set(sums)) == 1 else 'DIVERGED'}")
    runlog.close()

    weights = ema.weights_for(raw) if ema else raw.state_dict()
    trained = s.steps - start
    if acc.is_main_process and (trained or not s.stage.model.exists()):  # a finished model stays as it is
        extra = {"diffusion": config_to_dict(config.diffusion), "tokens": tokens_identity(meta),
                 "alpha": td.alpha, **s.extra_meta}
        checkpoint.save_model(s.stage.model, weights, "diffusion", asdict(raw.cfg), extra)
    acc.wait_for_everyone()
    return {
        "model": str(s.stage.model),
        "steps": f"{s.steps} ({'already finished' if trained == 0 else f'{trained} this run'}"
                 + (f", resumed from step {start})" if start else ")"),
        **({"loss": terms["loss"]} if trained else {}),  # none when already finished
        "processes": acc.num_processes,
        "steps/s": trained / elapsed if trained else 0.0,
    }


def tokens_identity(tokens_meta: dict) -> dict:
    """What makes tokens/ what it is: the VQ, the CLIP and the [data] they were made from."""
    return {k: tokens_meta[k] for k in ("vq_sha256", "clip", "data") if k in tokens_meta}


def _check_same_tokens(model_path: Path, tokens_meta: dict) -> None:
    """A finished model must have been trained on the tokens/ there now (tokenize may have run since).
    A model from before the data was recorded is compared on the VQ and the CLIP alone."""
    now = tokens_identity(tokens_meta)
    try:
        trained_on = json.loads(checkpoint.read_metadata(model_path).get("tokens", "null"))
    except json.JSONDecodeError:  # an edited file: its provenance is unknown, so it is not these tokens'
        trained_on = None
    if isinstance(trained_on, dict) and "data" not in trained_on:
        now.pop("data", None)
    if trained_on != now:
        raise UserError(f"{model_path} was trained on other tokens than tokens/ holds now (tokenize ran since): "
                        f"delete {model_path.parent} to train it again on them")


def _schedule_args(config: Config) -> dict:
    d = config.diffusion
    return dict(timesteps=d.timesteps, keep_start=d.keep_start, keep_end=d.keep_end,
                mask_start=d.mask_start, mask_end=d.mask_end)


def _aux_weight(config: Config) -> float:
    return config.diffusion.aux_weight
