"""The reverse process: classifier-free guidance, truncation and the sampling loop.

Pure functions over any denoiser callable
``denoiser(tokens (B, L) long, t (B,) long in 1..T, cond (B, C)) -> log p(x0) (B, K, L)``.

One step at time t, going to time s < t (s = 0 at the end):
    1. log p(x0 | x_t): one forward; with guidance s != 1 the conditional and
       the unconditional (null condition) halves run batched in ONE forward;
    2. guidance  g = u + scale (c - u), renormalised over the K classes;
    3. truncation to the top-r mass per position;
    4. x_s ~ p(x_s | x_t) from the exact Δ-step posterior
       (:meth:`clipvqd.diffusion.Schedule.log_p_prev`); at the last step x0 is
       drawn from p(x0 | x_t) directly.
Every random draw comes from the explicit ``generator``.
"""

from __future__ import annotations

import torch

from clipvqd.diffusion import LOG_ZERO, Schedule, sample_categorical
from clipvqd.errors import UserError


def guide(log_cond: torch.Tensor, log_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log p(x0): u + scale (c - u), renormalised over dim 1.

    Returns log-probabilities clamped to [LOG_ZERO, 0]; ``scale == 1`` returns ``log_cond``.
    """
    if scale == 1:
        return log_cond
    g = log_uncond + scale * (log_cond - log_uncond)
    return (g - g.logsumexp(dim=1, keepdim=True)).clamp(LOG_ZERO, 0.0)


def truncate(log_p: torch.Tensor, r: float, first_k: int = 64) -> torch.Tensor:
    """Keep, per position, the fewest most-likely classes whose mass reaches ``r``.

    ``log_p`` is (B, K, L) normalised log-probabilities; the other classes get
    LOG_ZERO (the kept ones are not renormalised: the posterior and Gumbel-max
    sampling do not need it). The top class is always kept. ``r >= 1`` keeps all.

    Cost: ``topk`` with a bound ``k`` (first 64, growing x4 only if some
    position needs more), instead of a full sort over K.
    """
    if r >= 1:
        return log_p
    K = log_p.shape[1]
    k = min(K, first_k)
    while True:
        values, index = log_p.topk(k, dim=1)  # sorted, most likely first
        cum = values.exp().cumsum(dim=1)
        if k == K or bool((cum[:, -1] >= r).all()):
            break
        k = min(K, 4 * k)
    keep = (cum - values.exp()) < r  # mass before this class has not reached r yet
    out = torch.full_like(log_p, LOG_ZERO)
    return out.scatter_(1, index, torch.where(keep, values, torch.full_like(values, LOG_ZERO)))


def timestep_subset(timesteps: int, steps: int) -> list[int]:
    """The ``steps`` timesteps visited, from T down to 1 (evenly spaced, rounded).

    ``steps == T`` gives T, T-1, ..., 1; ``steps == 1`` gives just T.
    """
    if not 1 <= steps <= timesteps:
        raise UserError(f"sampling steps must be between 1 and {timesteps}, got {steps}")
    if steps == 1:
        return [timesteps]
    stride = (timesteps - 1) / (steps - 1)
    return [round(timesteps - i * stride) for i in range(steps)]


@torch.no_grad()
def predict_x0(denoiser, x_t, t, cond, guidance: float = 1.0, truncation: float = 1.0, null_cond=None):
    """Guided, truncated log p(x0 | x_t) (B, K, L) float32; one denoiser forward."""
    if guidance == 1:
        log_p = denoiser(x_t, t, cond).float()
    else:
        if null_cond is None:
            raise UserError("guidance != 1 needs the model's learned null condition (run finetune-cfg first)")
        B = x_t.shape[0]
        null = null_cond.to(cond).expand(B, -1) if null_cond.dim() == 1 else null_cond.to(cond)
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null])).float()
        log_p = guide(both[:B], both[B:], guidance)
    return truncate(log_p, truncation)


@torch.no_grad()
def sample(
    denoiser,
    schedule: Schedule,
    cond: torch.Tensor,
    num_positions: int,
    steps: int | None = None,
    guidance: float = 1.0,
    truncation: float = 1.0,
    generator: torch.Generator | None = None,
    null_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw token grids by running the reverse process from all-mask.

    Args:
        denoiser: callable (tokens, t, cond) -> (B, K, L) log p(x0).
        schedule: the diffusion schedule (moved to cond's device, float32, here).
        cond: (B, C) conditions; B is the number of samples.
        num_positions: L = h * w.
        steps: number of denoiser evaluations (default T); fewer visits an
            evenly strided subset of 1..T with the exact Δ-step posterior.
        guidance: classifier-free guidance scale (1 = no guidance, one forward).
        truncation: keep the top-r mass of p(x0) per position (1 = off).
        generator: the source of every random draw (required).
        null_cond: (C,) or (B, C) null condition; needed when guidance != 1.
    Returns:
        (B, L) long tokens in 0..K-1 (no mask left).
    """
    if generator is None:
        raise ValueError("sample needs an explicit torch.Generator")
    if not 0 < truncation <= 1:
        raise UserError(f"truncation must be in (0, 1], got {truncation}")
    B, device = cond.shape[0], cond.device
    if schedule.device != device or schedule.dtype != torch.float32:
        schedule = schedule.to(device, torch.float32)
    K, T = schedule.num_classes, schedule.timesteps
    times = timestep_subset(T, T if steps is None else steps)
    x = torch.full((B, num_positions), schedule.mask_index, dtype=torch.long, device=device)
    for i, t in enumerate(times):
        s = times[i + 1] if i + 1 < len(times) else 0
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        log_x0 = predict_x0(denoiser, x, tt, cond, guidance, truncation, null_cond)
        if log_x0.shape[1] != K:
            raise ValueError(f"denoiser predicts {log_x0.shape[1]} classes, schedule has {K}")
        if s == 0:
            x = sample_categorical(log_x0, generator)  # x0 ~ p(x0 | x_t): real classes only
        else:
            x = sample_categorical(schedule.log_p_prev(log_x0, x, tt, s=s), generator)
    return x
