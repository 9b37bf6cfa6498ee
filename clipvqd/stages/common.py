"""Small pieces several stages share: the device, whether a CPU computes bf16
natively, the configured CLIP, the data section with its path resolved
against the project folder."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from clipvqd.config import Config
from clipvqd.errors import UserError
from clipvqd.project import Project

log = logging.getLogger("clipvqd")


def device_of(config: Config) -> torch.device:
    """The device of a non-training stage (tokenize, sample, rerank, eval)."""
    if config.project.threads:
        torch.set_num_threads(config.project.threads)
    choice = config.project.device
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("project.device = 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16).

    Elsewhere bf16 autocast is emulated and slower than fp32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


_warned_emulated_bf16 = False


def warn_if_bf16_is_emulated(mixed_precision: str, device: torch.device) -> None:
    """Log once per process when bf16 autocast will run on a CPU without native bf16: there torch
    emulates it, and a bf16 matmul ran 25-50x slower than fp32 (SPEED.md, the Zen 3 machine)."""
    global _warned_emulated_bf16
    if mixed_precision == "bf16" and device.type == "cpu" and not native_cpu_bf16() and not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        log.warning("project.mixed_precision = 'bf16' on a CPU without native bf16 (no AMX or AVX512-BF16): "
                    "torch emulates it, many times slower than fp32; set mixed_precision = 'no'")


def autocast(config: Config, device: torch.device):
    """Autocast for inference as ``project.mixed_precision`` asks (a no-op for 'no')."""
    mp = config.project.mixed_precision
    warn_if_bf16_is_emulated(mp, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def configured_clip(config: Config, project: Project, device):
    """The CLIP named by ``[clip]``; a relative weights path resolves against the project."""
    from clipvqd.clip import load_clip
    from safetensors import SafetensorError

    pretrained = config.clip.pretrained
    if pretrained and (Path(pretrained).suffix or "/" in pretrained):
        pretrained = str(project.resolve(pretrained))
    try:
        return load_clip(config.clip.model, pretrained, device)
    except SafetensorError as exc:  # e.g. a pickle handed as a tiny CLIP file: refused, never unpickled
        raise UserError(f"clip.pretrained {pretrained}: not a readable safetensors file ({exc}); "
                        "clipvqd never loads pickled files") from None


def data_identity(config: Config, project: Project) -> dict:
    """The [data] section as a record of which images a stage read: its path resolved, and written
    relative to the project folder when inside it (so that moving the whole project changes nothing)."""
    from clipvqd.config import config_to_dict

    data = config_to_dict(config.data)
    if data.get("path"):
        path = project.resolve(data["path"]).resolve()
        root = project.root.resolve()
        data["path"] = (path.relative_to(root).as_posix() or ".") if path.is_relative_to(root) else str(path)
    return data


def resolved_data(config: Config, project: Project):
    """The [data] section with its path made absolute against the project folder."""
    data = config.data
    return dataclasses.replace(data, path=str(project.resolve(data.path))) if data.path else data
