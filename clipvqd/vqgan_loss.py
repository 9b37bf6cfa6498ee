"""Losses for training the Gumbel VQ-GAN (as taming-transformers' VQLPIPSWithDiscriminator).

Generator step::

    nll   = l1_weight * mean|x - x_hat| + l2_weight * mean (x - x_hat)^2
            + edge_weight * mean edge(x) (x - x_hat)^2 + perceptual_weight * perceptual(x, x_hat)
    g     = -mean( D(x_hat) )                              (only once step >= disc_start)
    w     = clamp( ||grad nll|| / (||grad g|| + 1e-4), 0, 1e4 ) * disc_weight
            (both gradients taken at the decoder's last layer)
    total = nll + disc_factor * w * g + kl                 (kl already weighted by the model)

Discriminator step (hinge)::

    d_loss = disc_factor * 0.5 * ( mean relu(1 - D(x)) + mean relu(1 + D(x_hat)) )

with ``disc_factor`` = 0 before ``disc_start``.

The perceptual term is LPIPS-style on VGG16 features (see :class:`VGGPerceptual`).
It needs a local VGG16 weights file; nothing here ever downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipvqd.checkpoint import load_foreign_weights
from clipvqd.errors import UserError

__all__ = [
    "l1_loss",
    "l2_loss",
    "edge_map",
    "edge_l2_loss",
    "VGGPerceptual",
    "PatchDiscriminator",
    "hinge_d_loss",
    "generator_adv_loss",
    "adaptive_weight",
    "adopt_weight",
    "VQLoss",
]

_PERCEPTUAL_HELP = (
    "set train_vq.perceptual_weights to a local torchvision VGG16 state dict (.pth or .safetensors), "
    "or set train_vq.perceptual_weight = 0 to turn the perceptual loss off"
)


def l1_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements."""
    return (recon - target).abs().mean()


def l2_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements.

    Not in the paper (L1 + perceptual there). Without a perceptual loss, L1's
    per-pixel median favours the background wherever the encoder is still
    unsure, and a small foreground shape is learned slowly; the squared error
    pulls harder on the large foreground errors.
    """
    return (recon - target).pow(2).mean()


def edge_map(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1]: where the target image has an edge, widened by one pixel.

    At each pixel the largest absolute difference to any of its four
    neighbours over the channels, halved (images span [-1, 1]), then 3x3
    max-pooled so that one more pixel on each side counts. A function of the
    target only: no gradient.
    """
    t = target.detach()
    dx = (t[..., :, 1:] - t[..., :, :-1]).abs()
    dy = (t[..., 1:, :] - t[..., :-1, :]).abs()
    near = torch.maximum(torch.maximum(F.pad(dx, (0, 1, 0, 0)), F.pad(dx, (1, 0, 0, 0))),
                         torch.maximum(F.pad(dy, (0, 0, 0, 1)), F.pad(dy, (0, 0, 1, 0))))
    edges = (near.amax(dim=1, keepdim=True) / 2).clamp(max=1.0)
    return F.max_pool2d(edges, 3, stride=1, padding=1)


def edge_l2_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error counted only where the target has an edge (:func:`edge_map`).

    Not in the paper. Added to the plain squared error it weights the pixels on
    and beside an edge more, where a shape's corners decide what it is; the
    flat background, most of every image, weighs no more than before.
    """
    return ((recon - target).pow(2) * edge_map(target)).mean()


# --------------------------------------------------------------------------
# perceptual loss

# VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool. Built by hand so the
# 120M-parameter classifier is never allocated; indices match torchvision's
# ``vgg16().features`` so its state dict loads directly.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Index (in ``features``) of the ReLU that ends each of the 5 stages:
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_STAGE_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = v
    return nn.Sequential(*layers)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return load_foreign_weights(path, "weights file")


def _check_file(path: str | Path | None, what: str) -> Path:
    if path is None or str(path) == "":
        raise UserError(f"the perceptual loss needs a local {what} file: {_PERCEPTUAL_HELP}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"the perceptual loss needs a local {what} file, and {p} does not exist: {_PERCEPTUAL_HELP}")
    return p


class VGGPerceptual(nn.Module):
    """LPIPS-style distance on frozen VGG16 features.

    For each of the 5 standard VGG16 stages (relu1_2 ... relu5_3): unit-normalise
    the feature vector at every pixel across channels, take the squared
    difference, weight the channels, sum over channels, average over pixels;
    then sum the 5 stages. Returns one value per image, shape (B,).

    The channel weights are LPIPS's learned linear-calibration layers when
    ``lin_weights_path`` is given (LPIPS v0.1 ``vgg.pth``, keys
    ``lin{0..4}.model.1.weight``); otherwise all ones, i.e. a plain normalised
    feature distance (an uncalibrated LPIPS). Inputs are images in [-1, 1],
    shifted and scaled by LPIPS's ImageNet constants.

    ``weights_path``: torchvision VGG16 state dict (``vgg16-397923af.pth`` or a
    safetensors export), with or without the ``features.`` key prefix. Required;
    a missing path or file raises :class:`UserError`. Never downloads.
    """

    def __init__(self, weights_path: str | Path | None, lin_weights_path: str | Path | None = None) -> None:
        super().__init__()
        path = _check_file(weights_path, "VGG16 weights")
        state = _load_state_dict(path)
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        self.features = _vgg16_features()
        missing = sorted(set(self.features.state_dict()) - set(state))
        if missing:
            raise UserError(f"{path} is not a VGG16 state dict (missing {missing[0]} and {len(missing) - 1} more): {_PERCEPTUAL_HELP}")
        try:
            self.features.load_state_dict({k: state[k] for k in self.features.state_dict()})
        except RuntimeError as exc:
            raise UserError(f"{path} does not match VGG16's shapes: {exc}") from exc

        lin = [torch.ones(1, c, 1, 1) for c in _VGG16_STAGE_CHANNELS]
        if lin_weights_path is not None:
            lpath = _check_file(lin_weights_path, "LPIPS linear-layer weights")
            lstate = _load_state_dict(lpath)
            for i, c in enumerate(_VGG16_STAGE_CHANNELS):
                key = f"lin{i}.model.1.weight"
                if key not in lstate or tuple(lstate[key].shape) != (1, c, 1, 1):
                    raise UserError(f"{lpath} is not an LPIPS VGG linear-layer file (no {key} of shape (1, {c}, 1, 1))")
                lin[i] = lstate[key].float()
        for i, w in enumerate(lin):
            self.register_buffer(f"lin{i}", w)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGGPerceptual":
        """Always stays in eval mode (frozen network)."""
        return super().train(False)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG16_TAPS:
                taps.append(h)
                if i == _VGG16_TAPS[-1]:
                    break
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image, (B,); zero when x == y, symmetric."""
        total = x.new_zeros(x.shape[0])
        for i, (fx, fy) in enumerate(zip(self._stages(x), self._stages(y))):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = ((nx - ny).pow(2) * getattr(self, f"lin{i}")).sum(dim=1)
            total = total + d.mean(dim=(1, 2))
        return total


# --------------------------------------------------------------------------
# discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix "NLayer"), one logit per patch.

    4x4 convs: in -> C (stride 2) -> 2C -> 4C (stride 2, BatchNorm) -> 8C
    (stride 1, BatchNorm) -> 1 (stride 1); LeakyReLU 0.2 between. With the
    default ``base_channels = 64`` and ``n_layers = 3`` that is 64 -> 128 ->
    256 -> 512 -> 1. An H x W input gives (B, 1, H/8 - 2, W/8 - 2) logits.
    Weights start from N(0, 0.02) (BatchNorm scales from N(1, 0.02)), drawn
    from torch's global RNG like any module initialisation.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = base_channels
        for n in range(1, n_layers + 1):
            out_ch = base_channels * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ch, out_ch, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.LeakyReLU(0.2),
            ]
            ch = out_ch
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------
# adversarial pieces


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss, -mean(D(x_hat))."""
    return -logits_fake.mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    base_weight: float = 1.0, loss_scale: float = 1.0) -> torch.Tensor:
    """||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, 1e4], times ``base_weight``.

    W is ``last_layer`` (the decoder's output conv weight). The graph is kept
    for the later backward pass; the result is detached. Under fp16 pass the
    GradScaler's scale as ``loss_scale``: both gradients are taken of the
    scaled losses (and the 1e-4 scaled too, so the value is the same), else the
    reconstruction gradient, about 1 / (pixels in the batch), underflows fp16.
    A scale too large overflows instead, as the GradScaler expects now and
    then (it skips that step): a weight that is not finite counts as 0.
    """
    nll_grad = torch.autograd.grad(nll * loss_scale, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * loss_scale, last_layer, retain_graph=True)[0]
    w = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4 * loss_scale)
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    return w.clamp(0.0, 1e4).detach() * base_weight


def adopt_weight(step: int, disc_start: int, value: float = 1.0) -> float:
    """``value`` once ``step >= disc_start``, else 0 (GAN off during warm-up)."""
    return value if step >= disc_start else 0.0


def _frozen_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with gradients flowing to ``x`` but not into the module's parameters.

    The generator step must not leave gradients in the discriminator (they
    would leak into the next discriminator update). A wrapper such as DDP is
    bypassed (``.module``) so that it does not wait for gradients that never come.
    """
    inner = getattr(module, "module", module)
    flags = [p.requires_grad for p in inner.parameters()]
    inner.requires_grad_(False)
    try:
        return inner(x)
    finally:
        for p, flag in zip(inner.parameters(), flags):
            p.requires_grad_(flag)


class VQLoss(nn.Module):
    """All VQ-GAN loss terms; holds the discriminator and (optionally) the VGG.

    Arguments:
      l1_weight / l2_weight: weights of the mean absolute and mean squared
        reconstruction errors (the paper: 1 and 0).
      edge_weight: weight of the squared error counted on the target's edges
        (:func:`edge_l2_loss`; the paper: 0).
      perceptual_weight: 0 turns the perceptual term off (no VGG is built);
        > 0 needs ``perceptual_weights`` (a local VGG16 file) or raises UserError.
      disc_weight: base weight multiplying the adaptive GAN weight.
      disc_start: first step at which the GAN terms count.
      disc_factor: overall factor on the GAN terms once active.
      disc_channels / disc_layers: PatchGAN width and depth.

    Checkpoint ``self.discriminator`` only; the VGG is frozen and re-read
    from its file.
    """

    def __init__(self, *, in_channels: int = 3, l1_weight: float = 1.0, l2_weight: float = 0.0,
                 edge_weight: float = 0.0,
                 perceptual_weight: float = 0.0,
                 perceptual_weights: str | Path | None = None, lpips_lin_weights: str | Path | None = None,
                 disc_weight: float = 0.8, disc_start: int = 0, disc_factor: float = 1.0,
                 disc_channels: int = 64, disc_layers: int = 3) -> None:
        super().__init__()
        if perceptual_weight < 0:
            raise UserError(f"train_vq.perceptual_weight must be >= 0, got {perceptual_weight}")
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.edge_weight = edge_weight
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.disc_factor = disc_factor
        self.perceptual = VGGPerceptual(perceptual_weights, lpips_lin_weights) if perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers)

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial terms count at ``step`` (so the loop runs the D step)."""
        return adopt_weight(step, self.disc_start, self.disc_factor) > 0

    def generator_step(self, inputs: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None = None, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Loss terms for the VQ-GAN (generator) update; backprop ``["total"]``.

        ``kl`` is the model's already weighted KL term (``info["kl"]``).
        The discriminator's parameters get no gradient from this step.
        ``last_layer`` (``model.last_layer_weight()``) is needed once the GAN
        is active. Before ``disc_start`` the discriminator is not run at all
        and ``g_loss`` / ``d_weight`` are reported as 0.
        """
        l1 = l1_loss(recon, inputs)
        l2 = l2_loss(recon, inputs)
        zero = recon.new_zeros(())
        edge = edge_l2_loss(recon, inputs) if self.edge_weight > 0 else zero
        if self.perceptual is not None:
            perceptual = self.perceptual(inputs.contiguous(), recon.contiguous()).mean()
        else:
            perceptual = zero
        nll = self.l1_weight * l1 + self.l2_weight * l2 + self.edge_weight * edge + self.perceptual_weight * perceptual

        factor = adopt_weight(step, self.disc_start, self.disc_factor)
        if factor > 0:
            if last_layer is None:
                raise ValueError("generator_step needs last_layer once the GAN is active")
            logits_fake = _frozen_forward(self.discriminator, recon.contiguous())
            g_loss = generator_adv_loss(logits_fake)
            if torch.is_grad_enabled() and nll.requires_grad:
                d_weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight, loss_scale)
            else:  # evaluation without gradients: no adaptive weight to measure
                d_weight = zero + self.disc_weight
        else:
            g_loss, d_weight = zero, zero
        total = nll + factor * d_weight * g_loss + kl
        return {
            "l1": l1.detach(),
            "l2": l2.detach(),
            "edge": edge.detach(),
            "perceptual": perceptual.detach(),
            "nll": nll.detach(),
            "g_loss": g_loss.detach(),
            "d_weight": d_weight.detach(),
            "disc_factor": recon.new_tensor(factor),
            "kl": kl.detach(),
            "total": total,
        }

    def discriminator_step(self, inputs: torch.Tensor, recon: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Loss terms for the discriminator update; backprop ``["d_loss"]``.

        ``recon`` is detached here, so the VQ-GAN gets no gradient from this step.
        """
        logits_real = self.discriminator(inputs.detach().contiguous())
        logits_fake = self.discriminator(recon.detach().contiguous())
        factor = adopt_weight(step, self.disc_start, self.disc_factor)
        d_loss = factor * hinge_d_loss(logits_real, logits_fake)
        return {
            "d_loss": d_loss,
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
