"""The reverse process: classifier-free guidance, truncation and the sampling loop.

Pure functions over any denoiser callable
``denoiser(tokens (B, L) long, t (B,) long in 1..T, cond (B, C)) -> log p(x0) (B, K, L)``.

One step at time t, going to time s < t (s = 0 at the end):
    1. log p(x0 | x_t): one forward; with guidance s != 1 the conditional and
       the unconditional (null condition) halves run batched in ONE forward;
    2. guidance  g = u + scale (c - u), renormalised over the K classes;
    3. x0 ~ p(x0 | x_t) truncated to its top-r mass per position
       (:func:`draw_truncated`, the set :func:`truncate` keeps);
    4. x_s ~ q(x_s | x_t, x0) (:meth:`clipvqd.diffusion.Schedule.draw_prev_given_x0`);
       at the last step x_s = x0.
Steps 3-4 are ancestral sampling through x0: x_s has exactly the distribution
of the Δ-step posterior p(x_s | x_t) = Σ_x0 q(x_s | x_t, x0) p(x0 | x_t)
(:meth:`clipvqd.diffusion.Schedule.log_p_prev`), but costs one pass over the
K classes for the draw instead of a sort, the posterior over K + 1 states and
K + 1 random numbers per position (SPEED.md).
Every random draw comes from the explicit ``generator``.
"""

from __future__ import annotations

import torch

from clipvqd.diffusion import LOG_ZERO, Schedule, uniform
from clipvqd.errors import UserError


def guide(log_cond: torch.Tensor, log_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log p(x0): u + scale (c - u), renormalised over dim 1.

    The inputs must be floored at LOG_ZERO, as the reference clamps its
    predictions (:func:`predict_x0` floors the denoiser's output): below log 0
    the difference c - u means nothing, and scaled up it could lift a class
    both halves rule out (c = -100, u = -160) above the top one. Returns
    log-probabilities clamped to [LOG_ZERO, 0]; ``scale == 1`` returns ``log_cond``.
    """
    if scale == 1:
        return log_cond
    g = torch.lerp(log_uncond, log_cond, float(scale))  # u + scale (c - u)
    return g.sub_(g.logsumexp(dim=1, keepdim=True)).clamp_(LOG_ZERO, 0.0)


def truncate(log_p: torch.Tensor, r: float) -> torch.Tensor:
    """Keep, per position, the fewest most-likely classes whose mass reaches ``r``.

    ``log_p`` is (B, K, L) normalised log-probabilities; the other classes get
    LOG_ZERO (the kept ones are not renormalised). The top class is always
    kept; ``r >= 1`` keeps all. Classes tied exactly with the least likely kept
    one are kept too: the result is a per-position threshold τ (the least likely
    kept log-probability, found by a sort) applied with one comparison.

    This is the definition of the truncated prediction. The sampler draws from
    it without sorting (:func:`draw_truncated`) and calls this only for the
    rare positions that need the set itself.
    """
    if r >= 1:
        return log_p
    B, K, L = log_p.shape
    ranked = log_p.transpose(1, 2).reshape(B * L, K).sort(dim=1, descending=True).values  # one row per position
    p = ranked.exp()
    n_keep = ((p.cumsum(dim=1) - p) < r).sum(dim=1, keepdim=True).clamp(min=1)  # the top class always counts
    tau = ranked.gather(1, n_keep - 1).view(B, L, 1).transpose(1, 2)  # (B, 1, L)
    return torch.where(log_p >= tau, log_p, torch.full_like(log_p, LOG_ZERO))


def _mass_above(d: torch.Tensor, p_x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_k p_k [p_k > p_x] along ``dim`` (kept), from d = p - p_x, which it overwrites.

    Computed as Σ d⁺ + p_x · #{d > 0}, the count as the sum of sign(d⁺): two
    in-place passes over d, where a comparison would write a fresh bool tensor
    and cost twice as much (the count is exact in float32 below 2^24 classes).
    """
    d = d.clamp_(min=0)
    positive = d.sum(dim=dim, keepdim=True)
    return d.sign_().sum(dim=dim, keepdim=True).mul_(p_x).add_(positive)


def draw_truncated(log_p: torch.Tensor, r: float, generator, tries: int = 4) -> torch.Tensor:
    """Draw x0 ~ p truncated to its top-``r`` mass (the classes :func:`truncate` keeps), renormalised.

    ``log_p`` is (B, K, L) normalised log-probabilities; returns (B, L) long.
    Exact, with no sort: draw a class from all of p by inverse CDF (a float64
    cumulative sum, one uniform), and keep it if it is in the kept set, else
    take the next draw. Class x is kept iff the mass of the classes strictly
    more likely than x is below r (ties with the least likely kept class are
    kept, and the top class always is, as in :func:`truncate`). The first kept
    draw has the distribution of p on the set, renormalised; each draw is kept
    with probability >= r. The uniforms for ``tries`` draws (plus one) are taken
    up front for every position, so that each row of the batch uses the same
    numbers from its generator whatever else happens: the first draw is checked
    everywhere, the other tries of the (few) rejected positions together, and a
    position with no kept draw among them is drawn from its set as
    :func:`truncate` finds it.
    """
    B, K, L = log_p.shape
    rows = B * L
    lp = log_p.transpose(1, 2).reshape(rows, K)  # one row per position (a view for the denoiser's layout)
    p = lp.exp()
    cum = p.double().cumsum_(dim=1)
    total = cum[:, -1:]
    u = uniform((B, L, tries + 1), generator, torch.float64).to(p.device).view(rows, tries + 1)
    # inverse CDF: the first class with cum >= target; the first try everywhere, the others below where needed
    # (torch's searchsorted ran several times faster with one value a row than with four in a probe; SPEED.md)
    pick = torch.searchsorted(cum, (1 - u[:, :1]) * total).clamp_(max=K - 1)  # (rows, 1)
    out = pick.view(-1).clone()
    if r >= 1:
        return out.view(B, L)
    # the first draw, everywhere, in place on p (large temporaries cost a CPU more in fresh pages than in arithmetic)
    p_x = p.gather(1, pick)
    above = _mass_above(p.sub_(p_x), p_x, dim=1)
    left = (above >= r * total).view(-1).nonzero().view(-1)
    if left.numel() and tries > 1:  # the other tries of the rejected positions, together
        p_left = lp[left].exp().unsqueeze(1)  # (n, 1, K)
        more = torch.searchsorted(cum[left], (1 - u[left, 1:tries]) * total[left]).clamp_(max=K - 1)
        p_x = p_left.squeeze(1).gather(1, more).unsqueeze(-1)  # (n, tries - 1, 1)
        above = _mass_above(p_left - p_x, p_x, dim=2).squeeze(-1)
        kept = above < r * total[left]
        found = kept.any(dim=1)
        first = kept.to(torch.uint8).argmax(dim=1)  # the first kept try
        out[left[found]] = more[found, first[found]]
        left = left[~found]
    if left.numel():  # no kept draw: draw from the set itself
        in_set = truncate(lp[left].unsqueeze(-1), r).squeeze(-1) > LOG_ZERO
        cum = torch.where(in_set, lp[left].exp(), 0.0).double().cumsum_(dim=1)
        out[left] = torch.searchsorted(cum, (1 - u[left, tries:]) * cum[:, -1:]).clamp_(max=K - 1).view(-1)
    return out.view(B, L)


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
    return truncate(guided_log_x0(denoiser, x_t, t, cond, guidance, null_cond), truncation)


@torch.no_grad()
def guided_log_x0(denoiser, x_t, t, cond, guidance: float = 1.0, null_cond=None):
    """Guided log p(x0 | x_t) (B, K, L) float32; one denoiser forward."""
    if guidance == 1:
        log_p = denoiser(x_t, t, cond).float()
    else:
        if null_cond is None:
            raise UserError("guidance != 1 needs the model's learned null condition (run finetune-cfg first)")
        B = x_t.shape[0]
        null = null_cond.to(cond).expand(B, -1) if null_cond.dim() == 1 else null_cond.to(cond)
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null])).float()
        # floored at log 0 before guidance (see guide), in place on the forward's fresh output: two
        # clamped copies cost a CPU 6-8 ms a step at the small size (new pages for every copy), this 0.3 ms
        both.clamp_(min=LOG_ZERO)
        log_p = guide(both[:B], both[B:], guidance)
    return log_p


@torch.no_grad()
def sample(
    denoiser,
    schedule: Schedule,
    cond: torch.Tensor,
    num_positions: int,
    steps: int | None = None,
    guidance: float = 1.0,
    truncation: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
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
        generator: the source of every random draw (required): one
            ``torch.Generator``, or a list of B (one per sample, so each sample
            depends only on its own seed, as long as the denoiser treats batch
            rows independently).
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
        log_x0 = guided_log_x0(denoiser, x, tt, cond, guidance, null_cond)
        if log_x0.shape[1] != K:
            raise ValueError(f"denoiser predicts {log_x0.shape[1]} classes, schedule has {K}")
        x0 = draw_truncated(log_x0, truncation, generator)
        x = x0 if s == 0 else schedule.draw_prev_given_x0(x0, x, tt, s, generator)
    return x
