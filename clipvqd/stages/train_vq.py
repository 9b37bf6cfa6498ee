"""`clipvqd train-vq`: train the Gumbel VQ-GAN tokenizer on the image source.

Writes vq/model.safetensors (usable with nothing else), config.json, log.jsonl,
previews/ (originals over reconstructions) and resumable checkpoints/.
Rerunning resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from clipvqd import checkpoint
from clipvqd.config import Config, config_to_dict
from clipvqd.data import make_grid, open_images, save_png
from clipvqd.models import vq_config
from clipvqd.project import Project
from clipvqd.errors import UserError
from clipvqd.stages.common import data_identity, resolved_data, warn_if_bf16_is_emulated
from clipvqd.templates import record_image_folder
from clipvqd.training import (
    EMA, Checkpointer, RunLog, StepBatches, check_finite, lr_factor, make_accelerator, set_lr, shard,
    step_counts_on_cpu, step_generator,
)
from clipvqd.vqgan import GumbelVQGAN, quantizer_schedule
from clipvqd.vqgan_loss import VQLoss

PREVIEW_COUNT = 8


def run(config: Config, project: Project, record_in: Path | None = None) -> dict:
    """Train (or resume, or find finished) the tokenizer. ``record_in``: the project file in which to
    record data.path once the images have been opened (`clipvqd train-vq DIR`), so tokenize reads them too."""
    tc = config.train_vq
    acc = make_accelerator(config.project)
    warn_if_bf16_is_emulated(config.project.mixed_precision, acc.device)
    torch.manual_seed(config.project.seed)  # weight init only; every later draw has its own generator
    data = data_identity(config, project)
    images = open_images(resolved_data(config, project))
    # channels-last convolutions: faster train-vq steps on a CPU (RESULTS.md, "Speed": 1.00-1.35x)
    model = GumbelVQGAN(vq_config(config)).to(memory_format=torch.channels_last)
    loss_fn = VQLoss(
        l1_weight=tc.l1_weight, l2_weight=tc.l2_weight, edge_weight=tc.edge_weight,
        perceptual_weight=tc.perceptual_weight,
        perceptual_weights=str(project.resolve(tc.perceptual_weights)) if tc.perceptual_weights else None,
        lpips_lin_weights=str(project.resolve(tc.lpips_weights)) if tc.lpips_weights else None,
        disc_weight=tc.disc_weight, disc_start=tc.disc_start, disc_channels=tc.disc_channels,
    )
    loss_fn.discriminator.to(memory_format=torch.channels_last)
    global_batch = tc.batch_size * config.project.grad_accum * acc.num_processes
    lr = tc.lr * global_batch if tc.scale_lr else tc.lr
    opt_g = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None

    stage = project.vq
    ckpt = Checkpointer(stage.root, acc, made_from={"data": (data, "other images than this run would go on with "
                                                                   "([data] changed since, or train-vq DIR named another folder)")})
    modules = {"model": model, "disc": loss_fn.discriminator, **({"ema": ema} if ema else {})}
    start = ckpt.resume(modules, {"g": opt_g, "d": opt_d}, tc.steps, "train_vq.steps")
    if start == tc.steps and stage.model.exists():
        _check_same_data(stage.model, data)
    recorded = None  # only now: a folder the tokenizer will not train on is not recorded
    if record_in is not None and acc.is_main_process:
        recorded = record_image_folder(record_in, project.resolve(config.data.path))
    model, disc, opt_g, opt_d = acc.prepare(model, loss_fn.discriminator, opt_g, opt_d)
    step_counts_on_cpu(opt_g, opt_d)
    loss_fn.discriminator = disc
    if loss_fn.perceptual is not None:
        loss_fn.perceptual.to(acc.device)
    if acc.is_main_process and start < tc.steps:  # the config of a run that trains (a finished one keeps its own)
        stage.root.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(stage.config, json.dumps(config_to_dict(config), indent=2))

    mine = shard(len(images), acc.process_index, acc.num_processes)
    sampler = StepBatches(mine, tc.batch_size, config.project.seed, start, tc.steps, acc.process_index,
                          config.project.grad_accum)
    loader = torch.utils.data.DataLoader(images, batch_sampler=sampler, num_workers=config.project.num_workers)
    preview = torch.stack([images[i] for i in range(min(PREVIEW_COUNT, len(images)))])
    runlog = RunLog(stage.log, "train-vq", tc.steps, start, tc.log_every, enabled=acc.is_main_process)
    batches = iter(loader)
    terms: dict[str, float] = {}
    started = time.perf_counter()
    last_layer = acc.unwrap_model(model).last_layer_weight
    accumulating = config.project.grad_accum > 1
    for step in range(start, tc.steps):
        tau, hard = quantizer_schedule(step, tc.steps, config.vq.tau_start, config.vq.tau_end,
                                       config.vq.soft_fraction)
        step_lr = lr * lr_factor(step, 0, tc.steps, tc.lr_final)
        set_lr(opt_g, step_lr)
        set_lr(opt_d, step_lr)
        for micro in range(config.project.grad_accum):
            x = next(batches).to(acc.device).contiguous(memory_format=torch.channels_last)
            gen = step_generator(config.project.seed, step, acc.process_index, salt=micro, device=acc.device)
            with acc.accumulate(model, disc):
                with acc.autocast():
                    recon, info = model(x, tau, gen, hard=hard)
                    g_terms = loss_fn.generator_step(x, recon.float(), info["kl"].float(), step, last_layer(),
                                                     loss_scale=acc.scaler.get_scale() if acc.scaler else 1.0)
                if accumulating:  # a NaN micro-batch would poison the step the last one takes
                    check_finite({"total": float(g_terms["total"].detach())}, step + 1, stage.root, acc)
                acc.backward(g_terms["total"])
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                d_terms = {}
                if loss_fn.gan_active(step):
                    with acc.autocast():
                        d_terms = loss_fn.discriminator_step(x, recon.float(), step)
                    if accumulating:
                        check_finite({"d_loss": float(d_terms["d_loss"].detach())}, step + 1, stage.root, acc)
                    acc.backward(d_terms["d_loss"])
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
        terms = {k: float(v.detach()) for k, v in {**g_terms, **d_terms}.items()}
        terms.update(usage=info["usage"], perplexity=info["perplexity"], tau=tau, hard=float(hard), lr=step_lr)
        check_finite(terms, step + 1, stage.root, acc)
        if ema is not None:
            ema.update(acc.unwrap_model(model))
        runlog.step(step + 1, terms)
        done = step + 1
        if done % tc.save_every == 0 or done == tc.steps:
            ckpt.save(done, modules, {"g": opt_g, "d": opt_d})
        if acc.is_main_process and (done % tc.preview_every == 0 or done == tc.steps):
            _preview(acc.unwrap_model(model), preview, stage.previews / f"step-{done:07d}.png", acc.device)
    elapsed = time.perf_counter() - started
    runlog.close()

    final = acc.unwrap_model(model)
    weights = ema.weights_for(final) if ema else final.state_dict()
    trained = tc.steps - start
    # a finished run keeps its file as it is: a rewrite would change its bytes (safetensors orders the
    # metadata as it likes), hence its sha256, and so make the tokens and the denoiser built on it look stale
    if acc.is_main_process and (trained or not stage.model.exists()):
        checkpoint.save_model(stage.model, weights, "vq", final.cfg.to_dict(), {"data": data})
    acc.wait_for_everyone()
    return {
        "model": str(stage.model),
        **({"data.path": f"{recorded[0]} (now in {Path(record_in).name}, for tokenize"
                         + (", and as eval.reference_path)" if recorded[1] else ")")} if recorded else {}),
        "steps": f"{tc.steps} ({'already finished' if trained == 0 else f'{trained} this run'}"
                 + (f", resumed from step {start})" if start else ")"),
        **({"l1": terms["l1"], "l2": terms["l2"], "codebook usage (last batch)": terms["usage"],
            "perplexity (last batch)": terms["perplexity"]} if trained else {}),  # none when already finished
        "steps/s": trained / elapsed if trained else 0.0,
    }


def _check_same_data(model_path: Path, data: dict) -> None:
    """A finished tokenizer must have been trained on the images [data] names now. (A file from
    before the data was recorded is not checked.)"""
    recorded = checkpoint.read_metadata(model_path).get("data")
    try:
        trained_on = json.loads(recorded) if recorded is not None else data
    except json.JSONDecodeError:
        trained_on = None
    if trained_on != data:
        raise UserError(f"{model_path} was trained on other images than [data] names now: delete "
                        f"{model_path.parent} (and tokens/, diffusion/, diffusion-cfg/) to train on these")


@torch.no_grad()
def _preview(model: GumbelVQGAN, images: torch.Tensor, path, device) -> None:
    was_training = model.training
    model.eval()
    recon = model.decode(model.encode(images.to(device))).clamp(-1, 1).cpu()
    model.train(was_training)
    save_png(make_grid(torch.cat([images, recon]), nrow=len(images)), path)
