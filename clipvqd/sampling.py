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

    The inputs must be floored at LOG_ZERO, as the reference clamps its
    predictions (:func:`predict_x0` floors the denoiser's output): below log 0
    the difference c - u means nothing, and scaled up it could lift a class
    both halves rule out (c = -100, u = -160) above the top one. Returns
    log-probabilities clamped to [LOG_ZERO, 0]; ``scale == 1`` returns ``log_cond``.
    """
    if scale == 1:
        return log_cond
    g = torch.lerp(log_uncond, log_cond, float(scale))  # u + scale (c - u)
    return (g - g.logsumexp(dim=1, keepdim=True)).clamp(LOG_ZERO, 0.0)


def truncate(log_p: torch.Tensor, r: float, buckets_per_class: float | None = None, span: float = 20.0) -> torch.Tensor:
    """Keep, per position, the fewest most-likely classes whose mass reaches ``r``.

    ``log_p`` is (B, K, L) normalised log-probabilities; the other classes get
    LOG_ZERO (the kept ones are not renormalised: the posterior and Gumbel-max
    sampling do not need it). The top class is always kept; ``r >= 1`` keeps all.
    Classes tied exactly with the least likely kept one are kept too. The
    result is a per-position threshold τ (the least likely kept
    log-probability) applied with one comparison over the tensor.

    τ comes from the classes sorted by probability. A GPU sorts all K of them.
    On a CPU a sort or top-k over K dominated the sampling loop (SPEED.md,
    "What changed"), so there (``buckets_per_class`` defaults to 0.25 on a CPU,
    0 = sort everything) the classes of each position first fall into
    ``buckets_per_class * K`` equal-width buckets of log-probability below its
    most likely class (over its range, at most ``span`` nats; lower classes
    share the last bucket). Bucket order is value order, so one scatter-add of
    the probabilities and a cumulative sum over the buckets find the bucket
    where the mass from the top reaches ``r``, and only that bucket's few
    classes are sorted. (On a GPU, scatter-add's float atomics would make the
    sums, and so rare boundary cases, differ between runs.)
    """
    if r >= 1:
        return log_p
    B, K, L = log_p.shape
    x = log_p.transpose(1, 2).reshape(B * L, K)  # one row per position
    if buckets_per_class is None:
        buckets_per_class = 0.25 if x.device.type == "cpu" else 0.0
    if buckets_per_class > 0:
        cand, above, counts = _crossing_bucket(x, r, max(2, int(K * buckets_per_class)), span)
    else:
        cand, above = x, torch.zeros_like(x[:, :1])
        counts = torch.full((x.shape[0],), K, device=x.device)
    cand = cand.sort(dim=1, descending=True).values
    p_cand = cand.exp()
    n_keep = ((above + p_cand.cumsum(dim=1) - p_cand) < r).sum(dim=1, keepdim=True)
    n_keep = torch.minimum(n_keep.clamp(min=1), counts.unsqueeze(1))  # the top class always counts
    tau = cand.gather(1, n_keep - 1).view(B, L, 1).transpose(1, 2)  # (B, 1, L)
    return torch.where(log_p >= tau, log_p, torch.full_like(log_p, LOG_ZERO))


def _crossing_bucket(x: torch.Tensor, r: float, nb: int, span: float):
    """For rows ``x`` (positions, K) of log-probabilities: the classes of the bucket where the mass
    from the top reaches ``r`` (a (positions, most per bucket) table padded with -inf), the mass of
    the buckets above it, and how many classes it holds per row."""
    rows_n = x.shape[0]
    top = x.max(dim=1, keepdim=True).values
    depth = top - x  # >= 0; 0 at the most likely class
    width = depth.max(dim=1, keepdim=True).values.clamp(max=span)
    scale = torch.where(width > 0, (nb - 1) / width, torch.zeros_like(width))
    bucket = (depth * scale).clamp_(max=nb - 1).long()  # 0 holds the most likely class
    mass = torch.zeros(rows_n, nb, dtype=x.dtype, device=x.device).scatter_add_(1, bucket, x.exp())
    cum = mass.cumsum(dim=1)
    # the bucket where the mass reaches r (never past the last occupied one, whatever the rounding)
    cross = torch.minimum((cum < r).sum(dim=1, keepdim=True), bucket.max(dim=1, keepdim=True).values)
    above = torch.where(cross > 0, cum.gather(1, (cross - 1).clamp(min=0)), torch.zeros_like(top))
    inside = bucket == cross
    counts = inside.sum(dim=1)
    row, col = inside.nonzero(as_tuple=True)
    slot = torch.arange(row.numel(), device=x.device) - (counts.cumsum(0) - counts)[row]
    cand = torch.full((rows_n, int(counts.max())), float("-inf"), dtype=x.dtype, device=x.device)
    cand[row, slot] = x[row, col]
    return cand, above, counts


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
        # floored at log 0 before guidance (see guide), in place on the forward's fresh output: two
        # clamped copies cost a CPU 6-8 ms a step at the small size (new pages for every copy), this 0.3 ms
        both.clamp_(min=LOG_ZERO)
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
        log_x0 = predict_x0(denoiser, x, tt, cond, guidance, truncation, null_cond)
        if log_x0.shape[1] != K:
            raise ValueError(f"denoiser predicts {log_x0.shape[1]} classes, schedule has {K}")
        if s == 0:
            x = sample_categorical(log_x0, generator)  # x0 ~ p(x0 | x_t): real classes only
        else:
            x = sample_categorical(schedule.log_p_prev(log_x0, x, tt, s=s), generator)
    return x
