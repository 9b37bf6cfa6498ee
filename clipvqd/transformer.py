"""The denoising transformer of CLIP-VQDiffusion: tokens + t + CLIP vector -> log p(x0).

A plain pre-norm transformer over the h x w token grid, conditioned only
through adaptive LayerNorms (no cross-attention):

    x = embed(tokens) + row_pos + col_pos                 (B, L, D)
    for each block:
        x = x + SelfAttention(AdaLN_t(x, t))              non-causal, fused qkv
        x = x + MLP(AdaLN_clip(x, cond))                  conv 3x3 on the grid, depthwise, or linear
    log p(x0) = log_softmax(Linear(LayerNorm(x)))         over the K real classes

AdaLN(x) = LN(x) * (1 + scale) + shift with a non-affine LayerNorm, where
(scale, shift) come from a per-block learned timestep table (T rows) -> SiLU ->
Linear, or from the CLIP vector -> Linear -> SiLU -> Linear.

Timesteps ``t`` are 1..T (t = 1 is the least noisy), the same convention as
``clipvqd.diffusion``; this module does not import it. Token index K is the
mask. The output has shape (B, K, L), float32, normalised over K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipvqd.attention import attention
from clipvqd.errors import UserError


MLPS = ("conv", "dwconv", "linear")


@dataclass(frozen=True)
class DenoiserConfig:
    """Size of the denoiser. Paper: K=4096, 16x16, 24 layers, dim 512, 16 heads, cond 512, T=100."""

    num_classes: int = 4096  # K real codebook classes (the mask is the extra index K)
    height: int = 16  # token grid rows h
    width: int = 16  # token grid columns w
    layers: int = 24
    dim: int = 512  # model width
    heads: int = 16
    mlp: str = "conv"  # "conv" (two 3x3 convs on the grid, the released code), "dwconv" or "linear"
    mlp_ratio: int = 4
    cond_dim: int = 512  # CLIP embedding size
    timesteps: int = 100  # T

    def __post_init__(self):
        if self.mlp not in MLPS:
            raise UserError(f"transformer.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if self.dim % self.heads:
            raise UserError(f"transformer width {self.dim} is not divisible by heads {self.heads}")
        for name in ("num_classes", "height", "width", "layers", "dim", "heads", "mlp_ratio", "cond_dim", "timesteps"):
            if getattr(self, name) < 1:
                raise UserError(f"transformer.{name} must be positive, got {getattr(self, name)}")

    @property
    def seq_len(self) -> int:
        return self.height * self.width


GELU_SCALE = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU approximation x * sigmoid(1.702 x), as in the released code."""
    return x * torch.sigmoid(GELU_SCALE * x)


def _modulate(x: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift; x (B, L, D), scale_shift (B, 2D)."""
    scale, shift = scale_shift.unsqueeze(1).chunk(2, dim=-1)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:]), 1 + scale)


class AdaLNTime(nn.Module):
    """(scale, shift) from a learned timestep table -> SiLU -> Linear."""

    def __init__(self, timesteps: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(timesteps, dim)
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(self.table(t - 1)))


class AdaLNCond(nn.Module):
    """(scale, shift) from the CLIP vector -> Linear -> SiLU -> Linear (Adalayer-CLIP, Eq. 9)."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(cond_dim, dim)
        self.fc2 = nn.Linear(dim, 2 * dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(cond)))


class SelfAttention(nn.Module):
    """Non-causal multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v)  # (B, H, L, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class ConvMLP(nn.Module):
    """Two 3x3 convolutions on the h x w grid: D -> ratio*D -> D, quick GELU between."""

    def __init__(self, dim: int, ratio: int, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width
        self.conv1 = nn.Conv2d(dim, ratio * dim, 3, padding=1)
        self.conv2 = nn.Conv2d(ratio * dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # (B, h, w, D) viewed as NCHW is channels-last memory: no copy needed
        g = x.reshape(B, self.height, self.width, D).permute(0, 3, 1, 2)
        g = self.conv2(quick_gelu(self.conv1(g)))
        return g.permute(0, 2, 3, 1).reshape(B, L, D)


class DepthwiseConvMLP(nn.Module):
    """D -> ratio*D (linear) -> depthwise 3x3 on the grid -> quick GELU -> D (linear).

    Each token still reads its 3x3 neighbourhood, as in ConvMLP, but the
    spatial mixing is one 3x3 filter per hidden channel: per token 2 ratio D^2
    + 9 ratio D multiply-adds instead of ConvMLP's 18 ratio D^2 (SegFormer's
    Mix-FFN; not the paper's).
    """

    def __init__(self, dim: int, ratio: int, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.dw = nn.Conv2d(ratio * dim, ratio * dim, 3, padding=1, groups=ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        h = self.fc1(x)
        g = h.reshape(B, self.height, self.width, h.shape[-1]).permute(0, 3, 1, 2)  # channels-last view
        g = quick_gelu(self.dw(g))
        return self.fc2(g.permute(0, 2, 3, 1).reshape(B, L, -1))


class LinearMLP(nn.Module):
    """Position-wise MLP: D -> ratio*D -> D, quick GELU between.

    Computed as fc2(quick_gelu(fc1(x))) with quick_gelu(h) = silu(1.702 h) / 1.702:
    the two scalings ride on the matmuls (addmm's alpha and beta), leaving one
    elementwise pass (in place at inference) instead of three, a sixth of a
    fp32 forward on a CPU (SPEED.md).

    addmm takes the weights as ``weight.t()``, a view, and autocast caches only
    casts of the parameters themselves, so under autocast it would cast these
    two weights again every forward. At inference (no grad) they are cast once
    and kept until a weight changes (its version counter), the autocast dtype
    or its device does: 2-6 % of a paper-size bf16 forward on a CPU (SPEED.md).
    """

    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)
        self._cast: tuple | None = None  # (key, the weights, fc1.weight.t() and fc2.weight.t() cast)

    def _weights_t(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = self.fc1.weight, self.fc2.weight
        device = x.device.type
        if torch.is_grad_enabled() or not torch.is_autocast_enabled(device) or w1.dtype != torch.float32:
            if self._cast is not None:  # (nn.Module's __setattr__ costs microseconds: only when needed)
                self._cast = None  # training (or no autocast): autograd and autocast see the parameters
            return w1.t(), w2.t()
        key = (torch.get_autocast_dtype(device), w1.data_ptr(), w1._version, w2.data_ptr(), w2._version)
        if self._cast is None or self._cast[0] != key:
            # the entry holds the weights themselves: while it exists their storage cannot be freed,
            # so no other tensor can turn up at the same data_ptr
            self._cast = (key, (w1.detach(), w2.detach()), w1.t().to(key[0]), w2.t().to(key[0]))
        return self._cast[2], self._cast[3]

    def _apply(self, fn, *args, **kwargs):
        self._cast = None  # .to(), .cuda(), .half(), ...: new weights, and the old ones are not pinned
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        w1_t, w2_t = self._weights_t(x)
        h = torch.addmm(self.fc1.bias, rows, w1_t, beta=GELU_SCALE, alpha=GELU_SCALE)
        h = F.silu(h, inplace=not torch.is_grad_enabled())  # in place would lose what silu's backward needs
        y = torch.addmm(self.fc2.bias, h, w2_t, alpha=1 / GELU_SCALE)
        return y.view(*x.shape[:-1], y.shape[-1])


class Block(nn.Module):
    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.ada_t = AdaLNTime(cfg.timesteps, cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads)
        self.ada_c = AdaLNCond(cfg.cond_dim, cfg.dim)
        if cfg.mlp == "conv":
            self.mlp = ConvMLP(cfg.dim, cfg.mlp_ratio, cfg.height, cfg.width)
        elif cfg.mlp == "dwconv":
            self.mlp = DepthwiseConvMLP(cfg.dim, cfg.mlp_ratio, cfg.height, cfg.width)
        else:
            self.mlp = LinearMLP(cfg.dim, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_modulate(x, self.ada_t(t)))
        return x + self.mlp(_modulate(x, self.ada_c(cond)))


class Denoiser(nn.Module):
    """Predicts log p(x0 | x_t, t, cond) over the K real classes.

    ``forward(tokens (B, L) long in 0..K, t (B,) long in 1..T, cond (B, cond_dim))``
    returns (B, K, L) float32 log-probabilities. ``null_cond`` is the learned
    "no condition" vector for classifier-free guidance; get it with
    :meth:`null_condition`.
    """

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.row_embed = nn.Embedding(cfg.height, cfg.dim)
        self.col_embed = nn.Embedding(cfg.width, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.num_classes)
        self.null_cond = nn.Parameter(torch.randn(cfg.cond_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Linear and embedding weights N(0, 0.02), biases 0 (convs keep PyTorch's default)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def null_condition(self, batch: int, normalized: bool = True) -> torch.Tensor:
        """The learned null condition as (batch, cond_dim).

        ``normalized=True`` (our default, in training and at inference) L2-normalises
        it like a CLIP embedding; ``False`` gives the raw vector, which is what the
        released code used at inference.
        """
        v = F.normalize(self.null_cond, dim=0) if normalized else self.null_cond
        return v.unsqueeze(0).expand(batch, -1)

    def positions(self) -> torch.Tensor:
        """(L, D) row + column position embeddings, row-major (index = row * w + col)."""
        return (self.row_embed.weight[:, None, :] + self.col_embed.weight[None, :, :]).reshape(-1, self.cfg.dim)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, L = tokens.shape
        if L != self.cfg.seq_len:
            raise ValueError(f"expected {self.cfg.seq_len} tokens per sample, got {L}")
        x = self.token_embed(tokens) + self.positions()
        t = t.expand(B) if t.dim() == 0 else t
        for block in self.blocks:
            x = block(x, t, cond)
        logits = self.out(self.out_norm(x)).float()
        return logits.log_softmax(dim=-1).transpose(1, 2)
