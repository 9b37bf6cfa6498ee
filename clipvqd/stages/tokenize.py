"""`clipvqd tokenize`: encode every training image once, so that the diffusion
model trains from flat arrays and never runs the VQ or CLIP in its loop.

tokens/codes.npy  uint16 (N, h*w)   argmax VQ codes
tokens/clip.npy   float16 (N, d)    L2-normalised CLIP image embeddings
tokens/meta.json  what produced them (VQ file hash, CLIP, data, sizes)

meta.json is written last and removed first, so a crash never leaves arrays
that look complete. Rerunning with the same inputs does nothing.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from clipvqd import checkpoint
from clipvqd.config import Config
from clipvqd.data import open_images
from clipvqd.errors import UserError
from clipvqd.models import load_vq
from clipvqd.project import Project
from clipvqd.stages.common import autocast, configured_clip, data_identity, device_of, resolved_data


def provenance(config: Config, project: Project, clip_name: str) -> dict:
    """Everything that decides the content of tokens/ (compared on rerun)."""
    vq_path = project.require(project.vq.model, "vq")
    return {
        "vq_sha256": checkpoint.file_sha256(vq_path),
        "clip": clip_name,
        "data": data_identity(config, project),
    }


META_FIELDS = {"count": int, "grid": list, "codebook_size": int, "embed_dim": int, "vq_sha256": str, "clip": str}


def read_meta(project: Project) -> dict | None:
    """tokens/meta.json (None if there is none); a damaged or hand-edited one is a UserError."""
    path = project.tokens / "meta.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise UserError(f"tokens/meta.json cannot be read ({type(error).__name__}): rerun `clipvqd tokenize`") from None
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in META_FIELDS.items()):
        raise UserError("tokens/meta.json is not what `clipvqd tokenize` writes: rerun `clipvqd tokenize`")
    return meta


def run(config: Config, project: Project) -> dict:
    device = device_of(config)
    vq, _ = load_vq(project.require(project.vq.model, "vq"), device)
    if vq.cfg.image_size != config.data.image_size:  # the codes would not fill the VQ's token grid
        raise UserError(f"vq/model.safetensors was trained at {vq.cfg.image_size} px but data.image_size = "
                        f"{config.data.image_size}: restore data.image_size, or rerun `clipvqd train-vq` at the new size")
    clip = configured_clip(config, project, device)
    wanted = provenance(config, project, clip.name)
    try:
        meta = read_meta(project)
    except UserError:  # damaged: made again below
        meta = None
    if meta is not None and all(meta.get(k) == v for k, v in wanted.items()):
        return {"tokens": str(project.tokens), "status": "up to date (same VQ, CLIP and data): nothing to do",
                "images": meta["count"]}

    images = open_images(resolved_data(config, project))
    loader = torch.utils.data.DataLoader(images, batch_size=config.clip.batch_size,
                                         num_workers=config.project.num_workers)
    codes, embeds = [], []
    started = time.perf_counter()
    from rich.progress import track

    with torch.no_grad(), autocast(config, device):
        for batch in track(loader, description="tokenize", disable=not _tty(), transient=True):
            batch = batch.to(device)
            codes.append(vq.encode(batch).flatten(1).to(torch.int32).cpu())
            embeds.append(clip.embed_images(batch, config.clip.batch_size).float().cpu())
    elapsed = time.perf_counter() - started
    codes_np = torch.cat(codes).numpy().astype(np.uint16)
    embeds_np = torch.nn.functional.normalize(torch.cat(embeds), dim=-1).numpy().astype(np.float16)
    grid = vq.cfg.latent_size

    project.tokens.mkdir(parents=True, exist_ok=True)
    (project.tokens / "meta.json").unlink(missing_ok=True)
    _save_npy(project.tokens / "codes.npy", codes_np)
    _save_npy(project.tokens / "clip.npy", embeds_np)
    meta = {
        **wanted, "count": len(codes_np), "grid": [grid, grid], "codebook_size": vq.cfg.codebook_size,
        "embed_dim": int(embeds_np.shape[1]), "image_size": config.data.image_size,
    }
    checkpoint.atomic_write_text(project.tokens / "meta.json", json.dumps(meta, indent=2))
    return {"tokens": str(project.tokens), "images": len(codes_np), "grid": f"{grid}x{grid}",
            "clip": clip.name, "images/s": len(codes_np) / elapsed}


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _save_npy(path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    tmp.replace(path)
