"""What every training stage shares, and no loop: the Accelerator, per-step
generators, EMA, the learning-rate schedule, checkpoint/resume, the finite-loss
guard, and progress display with a ``log.jsonl`` of every loss term."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from clipvqd import checkpoint
from clipvqd.errors import UserError

log = logging.getLogger("clipvqd")


def make_accelerator(project_cfg, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator from ``[project]``: device, mixed precision, accumulation.

    Multi-GPU (and multi-process CPU) needs no code change: start the same
    command under ``accelerate launch`` or ``torchrun``.
    """
    if project_cfg.threads:
        torch.set_num_threads(project_cfg.threads)
    if project_cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("project.device = 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != project_cfg.mixed_precision:
        # One process running stages of different precisions (`clipvqd demo`: the tokenizer in fp32,
        # the denoiser in bf16). accelerate keeps one precision per process and refuses a second, so
        # its precision state starts afresh here; the process group (PartialState) is kept.
        AcceleratorState._reset_state()
    # broadcast_buffers=False: DDP would otherwise copy rank 0's buffers in place at every forward,
    # and the discriminator (BatchNorm) runs twice (real, fake) before one backward, whose graph
    # needs the first forward's running statistics unchanged. No other model has buffers.
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, broadcast_buffers=False)]
    return Accelerator(
        cpu=project_cfg.device == "cpu",
        mixed_precision=project_cfg.mixed_precision,
        gradient_accumulation_steps=project_cfg.grad_accum,
        kwargs_handlers=kwargs,
    )


def step_generator(seed: int, step: int, rank: int = 0, salt: int = 0, device="cpu") -> torch.Generator:
    """The generator for one training step of one process: a pure function of
    (seed, step, rank, salt), so a resumed run draws exactly what an
    uninterrupted one would."""
    mixed = (seed * 1_000_003 + step * 9_176 + rank * 7_919 + salt * 104_729) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    Made (and resumed) before ``accelerator.prepare`` moves the model to its
    device, so each average follows its tensor there at the first update.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                if self.shadow[k].device != v.device:
                    self.shadow[k] = self.shadow[k].to(v.device)
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise UserError(f"checkpoint EMA lacks {sorted(missing)[:3]}: it was made by another model configuration")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def weights_for(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged tensors in place (cast back to each dtype)."""
        out = {}
        for k, v in model.state_dict().items():
            out[k] = self.shadow[k].to(v.dtype) if k in self.shadow else v
        return out


def step_counts_on_cpu(*optimizers) -> None:
    """Put Adam's per-parameter step counters back on the CPU after ``accelerator.prepare``.

    accelerate moves a resumed optimizer's whole state to the device before loading it, the
    step counters too; a non-capturable Adam then reads each one with ``.item()``: one device
    synchronisation per parameter per step. (On a CPU this changes nothing.)"""
    for optimizer in optimizers:
        for state in optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step) and step.device.type != "cpu":
                state["step"] = step.cpu()


def lr_factor(step: int, warmup: int, total: int, final: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to ``final`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(terms: dict[str, float], step: int, stage_dir: Path, acc: Accelerator | None = None) -> None:
    """Stop before poisoned weights are saved: name the step and the last good checkpoint.

    With ``acc`` and several processes, every process learns whether any of them saw a NaN (one
    small all-reduce), so that all stop with this line together; alone, the others would wait in
    the next gradient exchange until the launcher killed them."""
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if acc is not None and acc.num_processes > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=acc.device)
        if float(acc.reduce(flag, reduction="sum")) > 0 and not bad:
            bad = ["(on another process)"]
    if bad:
        last = checkpoint.latest_checkpoint(Path(stage_dir) / "checkpoints")
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise UserError(
            f"loss term(s) {', '.join(bad)} became NaN/Inf at step {step}; stopped without saving; {where} "
            "(try a lower learning rate, or mixed_precision = 'no')"
        )


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


class Checkpointer:
    """Saves and resumes a stage's training state in ``<stage>/checkpoints/``.

    ``made_from`` names the inputs the run trains on, each as {key: (value, what other values mean)},
    e.g. {"tokens": (identity, "other tokens (tokenize ran since)")}: every checkpoint records the
    values, and a checkpoint made from other inputs is refused on resume (a run must not go on
    training on what another run started from).
    """

    def __init__(self, stage_dir: Path, accelerator: Accelerator, keep: int = 2,
                 made_from: dict[str, tuple[Any, str]] | None = None):
        self.folder = Path(stage_dir) / "checkpoints"
        self.acc = accelerator
        self.keep = keep
        self.made_from = made_from or {}

    def save(self, step: int, modules: dict[str, Stateful], optimizers: dict[str, torch.optim.Optimizer], info=None):
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            states = {name: _state(self.acc, m) for name, m in modules.items()}
            opts = {name: o.state_dict() for name, o in optimizers.items()}
            info = {**(info or {}), "made_from": {key: value for key, (value, _) in self.made_from.items()}}
            checkpoint.save_training_state(checkpoint.checkpoint_path(self.folder, step), step, states, opts, info)
            checkpoint.prune_checkpoints(self.folder, self.keep)
        self.acc.wait_for_everyone()

    def resume(self, modules: dict[str, Stateful], optimizers: dict[str, torch.optim.Optimizer],
               steps: int, steps_key: str) -> int:
        """Load the newest checkpoint into the given objects and return its step (0 when there is none).
        A checkpoint past ``steps`` (the config value ``steps_key``) is refused before anything loads."""
        path = checkpoint.latest_checkpoint(self.folder)
        if path is None:
            return 0
        try:
            step, states, opts, info = checkpoint.load_training_state(path)
        except UserError as exc:  # damaged (copied, disk error): say how to go on from the one before
            raise UserError(f"{exc}; delete it to resume from the checkpoint before it, "
                            f"or delete {self.folder} to start over") from None
        recorded = info.get("made_from", {}) if isinstance(info, dict) else {}
        for key, (now, other) in self.made_from.items():
            if key in recorded and recorded[key] != now:  # (checkpoints from before this record: not checked)
                raise UserError(f"{path} was trained on {other}: delete {self.folder.parent} to start over")
        if step > steps:
            raise UserError(f"{path} is at step {step}, past {steps_key} = {steps}: raise the steps to go on, "
                            f"or delete {self.folder} to start over")
        for name, m in modules.items():
            if name not in states:
                raise UserError(f"{path}: has no '{name}' state; delete {self.folder} to start over")
            target = self.acc.unwrap_model(m) if isinstance(m, torch.nn.Module) else m
            try:
                target.load_state_dict(states[name])
            except RuntimeError as exc:
                raise UserError(
                    f"{path} was made by another configuration ({str(exc).splitlines()[0]}); "
                    f"delete {self.folder} to start over"
                ) from None
        for name, o in optimizers.items():
            o.load_state_dict(opts[name])
        return step


def _state(acc: Accelerator, obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return acc.unwrap_model(obj).state_dict()
    return obj.state_dict()


class RunLog:
    """Progress for one training run: a rich bar on a terminal, a plain line every
    ``every`` steps otherwise, and every loss term appended to ``log.jsonl``.
    Only the main process writes."""

    def __init__(self, path: Path, title: str, total: int, start: int, every: int, enabled: bool = True):
        self.path, self.title, self.total, self.every = Path(path), title, total, every
        self.enabled = enabled
        self.start_time = time.perf_counter()
        self.start_step = start
        self._bar = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a")
            if start:
                self.event(f"resumed at step {start}")
            if sys.stderr.isatty():
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self._bar = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True,
                )
                self._bar.start()
                self._task = self._bar.add_task(title, total=total, completed=start, info="")

    def event(self, text: str) -> None:
        """A one-off line in the log (resume, warnings) and on screen."""
        if self.enabled:
            self._fh.write(json.dumps({"event": text, "time": time.time()}) + "\n")
            self._fh.flush()
            log.info("%s: %s", self.title, text)

    def step(self, step: int, terms: dict[str, float]) -> None:
        """Record the terms of ``step`` (1-based count of finished steps)."""
        if not self.enabled:
            return
        if step % self.every == 0 or step == self.total:
            self._fh.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in terms.items()}}) + "\n")
            self._fh.flush()
            if self._bar is None:
                rate = (step - self.start_step) / max(1e-9, time.perf_counter() - self.start_time)
                shown = " ".join(f"{k}={v:.4g}" for k, v in list(terms.items())[:4])
                log.info("%s step %d/%d %s (%.2f steps/s)", self.title, step, self.total, shown, rate)
        if self._bar is not None:
            shown = " ".join(f"{k}={v:.3g}" for k, v in list(terms.items())[:2])
            self._bar.update(self._task, completed=step, info=shown)

    def steps_per_second(self, step: int) -> float:
        return (step - self.start_step) / max(1e-9, time.perf_counter() - self.start_time)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self.enabled:
            self._fh.close()


def shard(count: int, rank: int, world: int) -> torch.Tensor:
    """The indices of a data set that process ``rank`` of ``world`` reads: rank, rank+world, ..."""
    if count < world:
        raise UserError(f"the data set has {count} items, fewer than the {world} processes")
    return torch.arange(rank, count, world)


def batch_indices(indices: torch.Tensor, batch: int, seed: int, step: int, rank: int, micro: int = 0) -> torch.Tensor:
    """The items of one micro-batch: drawn with replacement from this process's
    shard by the step's own generator, so resuming at any step repeats exactly."""
    g = step_generator(seed, step, rank, salt=1000 + micro)
    return indices[torch.randint(len(indices), (batch,), generator=g)]


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler for a DataLoader: the index lists of steps ``start..total-1``
    (``micro`` micro-batches each), so decoding can run in worker processes."""

    def __init__(self, indices, batch, seed, start, total, rank, micro=1):
        self.args = (indices, batch, seed, rank)
        self.start, self.total, self.micro = start, total, micro

    def __iter__(self):
        indices, batch, seed, rank = self.args
        for step in range(self.start, self.total):
            for m in range(self.micro):
                yield batch_indices(indices, batch, seed, step, rank, m).tolist()

    def __len__(self):
        return (self.total - self.start) * self.micro
