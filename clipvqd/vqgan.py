"""The Gumbel VQ-GAN tokenizer: images <-> grids of discrete codes.

Pipeline (the paper's tokenizer: taming-transformers' Gumbel VQ-GAN)::

    image (B,3,H,W) -> Encoder -> (B,C,h,w) -> 1x1 conv -> logits (B,K,h,w)
      -> Gumbel-softmax, hard, straight-through, temperature tau -> one-hot y
      -> y @ codebook (K x d) -> z_q (B,d,h,w)
      -> 1x1 conv d -> C (only when C != d) -> Decoder -> image

with h = H / f and the downsampling factor f = 2 ** (len(channel_mult) - 1).

Our addition (off in the paper's configs): ``soft_fraction`` > 0 trains the
first part of the run on the soft relaxation (the decoder sees the softmax
mixture, as DALL-E's dVAE) and the rest on the hard codes. On a short CPU run
this learns far faster than hard codes from step 0 (see quantizer_schedule).

The reference quantiser projected from the encoder's channel count but was fed
a tensor with ``embed_dim`` channels, so it only worked when the two were
equal. Here the logits come straight from the encoder's C channels and the
codebook dimension d is free (a 1x1 conv maps d back to C for the decoder).

Building blocks follow taming-transformers: residual blocks with GroupNorm +
SiLU, single-head self-attention at chosen feature-map resolutions (in pixels,
e.g. 16 means "wherever the feature map is 16x16"), and a mid block
(res, attn, res) at the lowest resolution.

Randomness: only the Gumbel noise in ``forward``, drawn from the explicit
``generator`` argument. ``encode`` is deterministic (argmax of the logits).
Parameter initialisation uses torch's default (global) RNG, as every
``nn.Module`` does; seed it before building a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipvqd.attention import attention
from clipvqd.errors import UserError

__all__ = [
    "VQGANConfig",
    "GumbelVQGAN",
    "Encoder",
    "Decoder",
    "tau_at",
    "gumbel_noise",
    "gumbel_softmax_st",
    "kl_to_uniform",
    "codebook_stats",
]


# --------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class VQGANConfig:
    """Everything needed to rebuild a :class:`GumbelVQGAN`.

    Defaults are the paper's tokenizer (f = 16 at 256 px, K = 4096, d = 256).
    ``attn_resolutions`` are feature-map sizes in pixels (taming's convention):
    a level whose feature map is r x r gets attention when r is listed.
    """

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    image_size: int = 256
    codebook_size: int = 4096
    embed_dim: int = 256
    tau_start: float = 0.9
    tau_end: float = 0.01
    kl_weight: float = 5e-5
    gumbel_noise: float = 1.0
    soft_fraction: float = 0.0
    mid_attention: bool = True

    def __post_init__(self) -> None:
        # Accept lists (from TOML / JSON) and store tuples so the config stays hashable.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.factor not in (4, 8, 16):
            raise UserError(
                f"vq.channel_mult {list(self.channel_mult)} gives downsampling factor f = {self.factor}; "
                "use 3, 4 or 5 entries for f = 4, 8 or 16"
            )
        if self.image_size % self.factor != 0:
            raise UserError(f"vq image size {self.image_size} is not divisible by the downsampling factor f = {self.factor}")
        for name in ("in_channels", "base_channels", "num_res_blocks", "codebook_size", "embed_dim"):
            value = getattr(self, name)
            if value < (0 if name == "num_res_blocks" else 1):
                raise UserError(f"vq.{name} must be positive, got {value}")
        if min(self.channel_mult) < 1:
            raise UserError(f"vq.channel_mult entries must be >= 1, got {list(self.channel_mult)}")
        if not 0 < self.tau_end <= self.tau_start:
            raise UserError(f"vq temperatures need 0 < tau_end <= tau_start, got {self.tau_start} -> {self.tau_end}")
        if self.kl_weight < 0:
            raise UserError(f"vq.kl_weight must be >= 0, got {self.kl_weight}")
        if not 0 <= self.soft_fraction < 1:
            raise UserError(f"vq.soft_fraction must be in [0, 1), got {self.soft_fraction}")

    @property
    def factor(self) -> int:
        """Downsampling factor f: the token grid is (image_size / f) squared."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the token grid, h = w = image_size / f."""
        return self.image_size // self.factor

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "VQGANConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown VQ-GAN config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------
# pure functions: temperature schedule, Gumbel quantiser, statistics


def tau_at(step: int, total_steps: int, start: float = 0.9, end: float = 0.01) -> float:
    """Cosine-decayed Gumbel temperature.

    tau(n) = end + 0.5 * (start - end) * (1 + cos(pi * min(n / N, 1))),
    so tau(0) = start, tau(N/2) = (start + end) / 2 and tau(n >= N) = end.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(step / total_steps, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def quantizer_schedule(step: int, total_steps: int, start: float, end: float,
                       soft_fraction: float = 0.0) -> tuple[float, bool]:
    """(tau, hard) for training step ``step`` of ``total_steps``.

    With ``soft_fraction`` = 0 (the paper) every step is hard and tau decays
    over the whole run (:func:`tau_at`). Otherwise the first
    ``S = round(soft_fraction * total_steps)`` steps are soft (the decoder sees
    the softmax mixture of codes) while tau decays from ``start`` to ``end``
    over those S steps; the remaining steps are hard at tau = ``end``, so the
    decoder finishes on exactly the one-hot codes that ``encode`` produces.
    """
    soft_steps = round(soft_fraction * total_steps)
    if soft_steps <= 0:
        return tau_at(step, total_steps, start, end), True
    if step < soft_steps:
        return tau_at(step, soft_steps, start, end), False
    return end, True


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples, g = -log(-log u), u ~ U(0, 1) from ``generator``.

    u is clamped away from 0 and 1 so that g stays finite.
    """
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(dtype).eps)
    return -torch.log(-torch.log(u))


def gumbel_softmax_st(logits: torch.Tensor, tau: float, generator: torch.Generator,
                      dim: int = 1, noise_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard Gumbel-softmax with a straight-through gradient.

    Returns ``(y, y_soft, codes)``:
      - ``y_soft = softmax((logits + g) / tau)`` with Gumbel noise g;
      - ``codes = argmax(y_soft)`` along ``dim`` (``dim`` removed);
      - ``y = one_hot(codes) + (y_soft - y_soft.detach())``: exactly one-hot in
        the forward pass (the added term is exactly zero), with the gradient
        of ``y_soft`` in the backward pass.

    ``noise_scale`` multiplies g: 1 is the Gumbel-softmax of the paper; smaller
    values draw codes closer to the argmax that ``encode`` uses; 0 draws nothing.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if noise_scale == 0:  # logits + 0 * g is logits exactly: skip the draw (six passes over (B, h, w, K))
        noisy = logits
    else:
        noisy = logits + noise_scale * gumbel_noise(logits.shape, generator, device=logits.device, dtype=logits.dtype)
    y_soft = torch.softmax(noisy / tau, dim=dim)
    codes = y_soft.argmax(dim=dim)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, codes.unsqueeze(dim), 1.0)
    y = y_hard + (y_soft - y_soft.detach())
    return y, y_soft, codes


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform) per position, averaged: mean of sum_k q_k log(K q_k).

    q = softmax(logits) over ``dim`` (K classes). Zero exactly when the logits
    are constant along ``dim``; at most log K.
    """
    log_q = torch.log_softmax(logits, dim=dim)
    num_classes = logits.shape[dim]
    kl = (log_q.exp() * (log_q + math.log(num_classes))).sum(dim=dim)
    return kl.mean()


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """Usage and perplexity of a batch of hard codes.

    usage: fraction of the K codes that occur at least once in ``codes``.
    perplexity: exp(entropy) of the empirical code histogram, between 1 (one
    code everywhere) and K (all codes equally often).
    """
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    usage = float((counts > 0).sum().item()) / codebook_size
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return usage, float(entropy.exp().item())


# --------------------------------------------------------------------------
# building blocks


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises in fp32 when it meets bf16 on a CPU.

    Inside this model under CPU bf16 autocast, torch's bf16 group norm made a
    tokenizer training step 1.39x the fp32 time; normalising in fp32 there
    brings it to 1.07x (examples/benchmarks/precision.py, one run).
    Same parameters and state dict as nn.GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        return super().forward(x)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where possible (taming), fewer for narrow layers."""
    return GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (b, hw, c)
        out = attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """res -> attention -> res at the lowest resolution (attention optional)."""

    def __init__(self, channels: int, attention: bool = True) -> None:
        super().__init__()
        self.block1 = ResBlock(channels, channels)
        self.attn = AttnBlock(channels) if attention else nn.Identity()
        self.block2 = ResBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, out_channels, H/f, W/f).

    Level i works at ``base * channel_mult[i]`` channels with ``num_res_blocks``
    residual blocks (each followed by attention when the level's resolution is
    in ``attn_resolutions``), then halves the resolution (except the last).
    ``out_channels = base * channel_mult[-1]``.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        layers: list[nn.Module] = []
        res, ch = cfg.image_size, cfg.base_channels
        for i, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out_ch))
                ch = out_ch
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(ch))
            if i != len(chans) - 1:
                layers.append(Downsample(ch))
                res //= 2
        self.down = nn.Sequential(*layers)
        self.mid = MidBlock(ch, cfg.mid_attention)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, ch, 3, padding=1)
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, base * channel_mult[-1], h, w) -> image (B, in_channels, h*f, w*f).

    The mirror of :class:`Encoder`, with ``num_res_blocks + 1`` residual blocks
    per level (as taming) and nearest-neighbour upsampling. No output
    squashing: outputs are roughly in [-1, 1] once trained.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chans[-1]
        self.in_channels = ch
        self.conv_in = nn.Conv2d(ch, ch, 3, padding=1)
        self.mid = MidBlock(ch, cfg.mid_attention)
        layers: list[nn.Module] = []
        res = cfg.latent_size
        for i in reversed(range(len(chans))):
            out_ch = chans[i]
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(ch, out_ch))
                ch = out_ch
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(ch))
            if i != 0:
                layers.append(Upsample(ch))
                res *= 2
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------
# the model


class GumbelVQGAN(nn.Module):
    """Encoder, Gumbel quantiser over a K x d codebook, decoder.

    - ``forward(x, tau, generator, hard=True) -> (recon, info)``: the training
      path, with Gumbel noise; ``hard=False`` decodes the soft relaxation
      (the softmax mixture of codebook vectors) instead of the one-hot codes.
      ``info`` holds ``kl`` (weighted by ``kl_weight``, add it to the loss),
      ``kl_unweighted``, ``codes`` (B, h, w) long, ``usage`` and
      ``perplexity`` (floats, from the hard codes of this batch).
    - ``encode(x) -> codes`` (B, h, w) long: argmax of the logits, no noise.
    - ``decode(codes) -> images`` (B, in_channels, H, W), roughly in [-1, 1].
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        hidden = self.encoder.out_channels
        self.to_logits = nn.Conv2d(hidden, cfg.codebook_size, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        self.decoder = Decoder(cfg)
        if cfg.embed_dim != self.decoder.in_channels:
            self.post_quant = nn.Conv2d(cfg.embed_dim, self.decoder.in_channels, 1)
        else:
            self.post_quant = nn.Identity()

    # -- pieces -----------------------------------------------------------

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised code scores (B, K, h, w) for images in [-1, 1]."""
        self._check_images(x)
        return self.to_logits(self.encoder(x))

    def embed(self, weights: torch.Tensor) -> torch.Tensor:
        """Weighted codebook lookup: (B, h, w, K) weights (codes last) -> (B, d, h, w)."""
        return torch.matmul(weights, self.codebook.weight).permute(0, 3, 1, 2)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) quantised vectors -> images."""
        return self.decoder(self.post_quant(z_q))

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    # -- main entry points -------------------------------------------------

    def forward(self, x: torch.Tensor, tau: float, generator: torch.Generator,
                hard: bool = True) -> tuple[torch.Tensor, dict]:
        # Quantiser math in fp32 even under autocast, with the K codes as the last
        # (contiguous) dimension: on a CPU a softmax over it, and its gradient, is
        # much faster than over dim 1 of (B, K, h, w).
        logits = self.logits(x).float().permute(0, 2, 3, 1)  # (B, h, w, K)
        y, y_soft, codes = gumbel_softmax_st(logits, tau, generator, dim=-1, noise_scale=self.cfg.gumbel_noise)
        recon = self.decode_latent(self.embed(y if hard else y_soft))
        kl_raw = kl_to_uniform(logits, dim=-1)
        usage, perplexity = codebook_stats(codes.detach(), self.cfg.codebook_size)
        info = {
            "kl": self.cfg.kl_weight * kl_raw,
            "kl_unweighted": kl_raw,
            "codes": codes,
            "usage": usage,
            "perplexity": perplexity,
        }
        return recon, info

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic token grid (B, h, w), long: argmax over the K logits."""
        return self.logits(x).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Token grid (B, h, w) of ints in [0, K) -> images (B, C, h*f, w*f)."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be (B, h, w), got shape {tuple(codes.shape)}")
        z_q = self.codebook(codes.long()).permute(0, 3, 1, 2)
        return self.decode_latent(z_q)

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected images (B, {self.cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
        f = self.cfg.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image sides {tuple(x.shape[-2:])} must be divisible by f = {f}")
