"""Tiny projects that train in seconds on a CPU, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = """
[project]
seed = 3
device = "cpu"
threads = 1
[data]
source = "shapes"
image_size = 32
count = 64
[vq]
codebook_size = 32
embed_dim = 8
base_channels = 8
channel_mult = [1, 2, 2]
[train_vq]
steps = 12
batch_size = 4
save_every = 3
log_every = 1
preview_every = 6
disc_start = 6
disc_channels = 8
ema_decay = 0.9
[transformer]
layers = 2
width = 32
heads = 2
[diffusion]
timesteps = 10
[train_diffusion]
steps = 12
batch_size = 8
warmup_steps = 2
save_every = 3
log_every = 1
[finetune_cfg]
steps = 6
batch_size = 8
save_every = 3
log_every = 1
[sample]
steps = 10
n = 2
batch_size = 4
"""


def write_tiny_project(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clipvqd.toml"
    path.write_text(TINY + extra)
    return path


def write_fake_tokens(folder: Path, count: int = 48, grid: int = 8, codebook: int = 32, dim: int = 16, seed: int = 0,
                      vq_sha256: str = "none") -> None:
    """A tokens/ folder as `clipvqd tokenize` writes it, with random content
    (structured so that the condition predicts the codes)."""
    rng = np.random.default_rng(seed)
    tokens = folder / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    classes = rng.integers(0, 4, count)
    codes = (classes[:, None] * 8 + rng.integers(0, 8, (count, grid * grid))) % codebook
    centres = rng.standard_normal((4, dim))
    emb = centres[classes] + 0.1 * rng.standard_normal((count, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.save(tokens / "codes.npy", codes.astype(np.uint16))
    np.save(tokens / "clip.npy", emb.astype(np.float16))
    meta = {"vq_sha256": vq_sha256, "clip": "fake", "data": {}, "count": count, "grid": [grid, grid],
            "codebook_size": codebook, "embed_dim": dim, "image_size": 32}
    (tokens / "meta.json").write_text(json.dumps(meta))


def write_vq(project_file: Path, **changes) -> Path:
    """An untrained but valid vq/model.safetensors for the project (optionally another config)."""
    import torch

    from clipvqd import checkpoint
    from clipvqd.config import load_config
    from clipvqd.models import vq_config
    from clipvqd.project import Project
    from clipvqd.vqgan import GumbelVQGAN

    config = load_config(project_file, [f"{k}={v}" for k, v in changes.items()])
    torch.manual_seed(0)
    model = GumbelVQGAN(vq_config(config))
    path = Project.from_file(project_file).vq.model
    checkpoint.save_model(path, model.state_dict(), "vq", model.cfg.to_dict())
    return path
