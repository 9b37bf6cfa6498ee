"""Build the project's two models from the config, and rebuild them from their
files alone (each model file carries the config that made it)."""

from __future__ import annotations

from pathlib import Path

import torch

from clipvqd import checkpoint
from clipvqd.config import Config
from clipvqd.errors import UserError
from clipvqd.transformer import Denoiser, DenoiserConfig
from clipvqd.vqgan import GumbelVQGAN, VQGANConfig


def vq_config(config: Config) -> VQGANConfig:
    vq = config.vq
    return VQGANConfig(
        base_channels=vq.base_channels, channel_mult=vq.channel_mult, num_res_blocks=vq.num_res_blocks,
        attn_resolutions=vq.attn_resolutions, image_size=config.data.image_size,
        codebook_size=vq.codebook_size, embed_dim=vq.embed_dim, tau_start=vq.tau_start,
        tau_end=vq.tau_end, kl_weight=vq.kl_weight, gumbel_noise=vq.gumbel_noise,
        soft_fraction=vq.soft_fraction, mid_attention=vq.mid_attention,
    )


def denoiser_config(config: Config, grid: tuple[int, int], cond_dim: int) -> DenoiserConfig:
    tr = config.transformer
    return DenoiserConfig(
        num_classes=config.vq.codebook_size, height=grid[0], width=grid[1], layers=tr.layers,
        dim=tr.width, heads=tr.heads, mlp=tr.mlp, mlp_ratio=tr.mlp_ratio, cond_dim=cond_dim,
        timesteps=config.diffusion.timesteps,
    )


def _load_into(model: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not match the configuration stored in the file ({str(exc).splitlines()[0]})") from None


def load_vq(path: Path, device="cpu") -> tuple[GumbelVQGAN, dict]:
    """The VQ-GAN in ``path`` (eval mode) and the file's metadata."""
    state, meta = checkpoint.load_model(path, "vq")
    model = GumbelVQGAN(VQGANConfig.from_dict(meta["config"]))
    _load_into(model, state, path)
    return model.to(device).eval(), meta


def load_denoiser(path: Path, device="cpu") -> tuple[Denoiser, dict]:
    """The denoiser in ``path`` (eval mode) and the file's metadata (incl. the diffusion schedule)."""
    state, meta = checkpoint.load_model(path, "diffusion")
    model = Denoiser(DenoiserConfig(**meta["config"]))
    _load_into(model, state, path)
    return model.to(device).eval(), meta
