"""Mask-and-replace discrete diffusion (VQ-Diffusion), as math only.

No nn parameters, no I/O. Everything a training step or a sampler needs:

- :class:`Schedule`: the noise schedule and every transition probability,
  built once in float64, then cast to the working device and dtype;
- forward process: :meth:`Schedule.log_q_xt_given_x0`,
  :meth:`Schedule.log_q_xt_given_xtm1`, :meth:`Schedule.q_sample`;
- reverse step: :meth:`Schedule.log_p_prev` (one step, or the exact Δ-step
  posterior for any ``s < t``: the loss uses it), and the sampler's draw
  :meth:`Schedule.draw_prev_given_x0` of x_s given x_t and one drawn x0;
- training: :func:`vlb_loss` and :class:`TimestepSampler`.

Conventions
-----------
* States: each of ``L`` positions holds a codebook index ``0..K-1`` or the mask
  index ``K``. A distribution over states is a tensor of log-probabilities of
  shape ``(B, K+1, L)`` (mask last); the model's prediction of ``x0`` has shape
  ``(B, K, L)`` (the mask class gets no probability). Log 0 is the floor
  ``LOG_ZERO = -70`` and results are clamped to ``[-70, 0]``.
* Time: ``t`` runs ``1..T`` as in the paper; ``t = 0`` is clean data. All
  schedule arrays are indexed by that same ``t`` (entry 0 is the identity), so
  ``cumulative_keep[t]`` is ᾱ_t. The transformer's timestep table uses the
  same 1-based ``t``.

The process
-----------
From time ``s`` to time ``t > s`` a real token stays itself with probability
``a + b``, becomes any given other real token with ``b``, becomes the mask
with ``c``; the mask stays the mask::

    a = ᾱ_t / ᾱ_s,    c = 1 - (1 - γ̄_t) / (1 - γ̄_s),    b = (1 - a - c) / K

``s = 0`` gives the marginal q(x_t | x0); ``s = t - 1`` the one-step kernel.
These two-time values are precomputed for every pair ``(s, t)`` in float64, so
composing steps is exact (Q_{s→u} Q_{u→t} = Q_{s→t}).
"""

from __future__ import annotations

import math

import torch

from clipvqd.errors import UserError

LOG_ZERO = -70.0
"""log 0 as a finite number (the reference code's floor)."""


def _log(x: torch.Tensor) -> torch.Tensor:
    """log with 0 (and tiny negatives from rounding) mapped to ``LOG_ZERO``."""
    return torch.log(x.clamp(min=0.0)).clamp(min=LOG_ZERO)


def log_onehot(tokens: torch.Tensor, num_states: int, dtype=torch.float32) -> torch.Tensor:
    """(B, L) integer tokens -> (B, num_states, L) log one-hot (0 / LOG_ZERO)."""
    out = torch.full(
        (tokens.shape[0], num_states, tokens.shape[1]), LOG_ZERO, dtype=dtype, device=tokens.device
    )
    return out.scatter_(1, tokens.unsqueeze(1).long(), 0.0)


def uniform(shape, generator, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) numbers (float32 unless ``dtype``) on the generator's device.

    ``generator`` is one ``torch.Generator``, or a list with one generator per
    row (``shape[0]``), so that each batch row is reproducible from its own seed
    whatever else is in the batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} rows")
        rows = [torch.rand(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack([r.to(rows[0].device) for r in rows])
    return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype)


class Schedule:
    """Mask-and-replace noise schedule with all transition probabilities.

    Args:
        num_classes: K, the codebook size (the mask is the extra index K).
        timesteps: T.
        keep_start, keep_end: ᾱ_1 and ᾱ_T (cumulative keep, linear in t).
        mask_start, mask_end: γ̄_1 and γ̄_T (cumulative mask, linear in t).

    Tables (all indexed by ``t`` in ``0..T``, float64 masters kept on CPU):
        ``cumulative_keep`` ᾱ, ``cumulative_mask`` γ̄, ``cumulative_replace`` β̄;
        ``step_keep`` α, ``step_mask`` γ, ``step_replace`` β (entry 0 = identity).
    Pairwise log tables of shape (T+1, T+1), entry ``[s, t]`` for ``s <= t``:
        ``log_a`` (keep), ``log_b`` (replace, per target class),
        ``log_a_plus_b`` (stay), ``log_c`` (mask), ``log_1m_c`` (not mask).
    These are in the working dtype/device; use :meth:`to` to move them.
    """

    def __init__(
        self,
        num_classes: int,
        timesteps: int = 100,
        keep_start: float = 0.99999,
        keep_end: float = 0.000009,
        mask_start: float = 0.000009,
        mask_end: float = 0.99999,
    ):
        if num_classes < 1:
            raise UserError(f"diffusion needs at least one codebook class, got num_classes={num_classes}")
        if timesteps < 1:
            raise UserError(f"diffusion needs at least one timestep, got timesteps={timesteps}")
        self.num_classes = K = int(num_classes)
        self.timesteps = T = int(timesteps)
        self.mask_index = K
        self.settings = dict(
            keep_start=keep_start, keep_end=keep_end, mask_start=mask_start, mask_end=mask_end
        )

        f64 = torch.float64
        frac = torch.arange(T, dtype=f64) / max(T - 1, 1)  # 0 at t=1, 1 at t=T
        keep = torch.cat([torch.ones(1, dtype=f64), keep_start + frac * (keep_end - keep_start)])
        mask = torch.cat([torch.zeros(1, dtype=f64), mask_start + frac * (mask_end - mask_start)])
        if (keep <= 0).any() or (mask >= 1).any() or (mask < 0).any() or (keep + mask > 1 + 1e-12).any():
            raise UserError(
                "diffusion schedule needs 0 < keep, 0 <= mask < 1 and keep + mask <= 1 at every step; "
                f"got {self.settings}"
            )

        # Pairwise transition s -> t (s <= t): a = ᾱ_t/ᾱ_s, 1-c = (1-γ̄_t)/(1-γ̄_s).
        a = keep[None, :] / keep[:, None]
        one_minus_c = (1 - mask[None, :]) / (1 - mask[:, None])
        b = (one_minus_c - a) / K
        valid = torch.ones(T + 1, T + 1, dtype=torch.bool).triu()
        if (b[valid] < -1e-12).any() or (a[valid] > 1 + 1e-12).any() or (one_minus_c[valid] > 1 + 1e-12).any():
            raise UserError(
                "diffusion schedule is not a valid process (some step would need a negative "
                f"probability); keep must fall and mask rise fast enough: {self.settings}"
            )
        # The posterior divides the prediction by q(x_t | x0), which is b for x0 != x_t. Log-probabilities
        # are floored at LOG_ZERO (e^-70), so b must stay well above that floor or the division turns
        # floored zeros back into mass (at b = 0, pure masking, it hands probability to impossible states).
        # Below e^-35, a floored class would come back with weight above e^-35. The defaults have b >= e^-27.
        if (b[valid.triu(1)] < math.exp(LOG_ZERO / 2)).any():
            raise UserError(
                "diffusion schedule has (almost) no uniform replacement: keep + mask must stay below 1 "
                f"(by more than about 1e-15 x the codebook size) at every step; got {self.settings}"
            )
        b = b.clamp(min=0.0)
        c = (1 - one_minus_c).clamp(min=0.0)
        nan = torch.tensor(float("nan"), dtype=f64)
        self._f64 = {}
        for name, value in (
            ("log_a", _log(a)),
            ("log_b", _log(b)),
            ("log_a_plus_b", _log(a + b)),
            ("log_c", _log(c)),
            ("log_1m_c", _log(one_minus_c)),
        ):
            self._f64[name] = torch.where(valid, value, nan)  # s > t is meaningless

        steps = torch.arange(1, T + 1)
        self.cumulative_keep = keep
        self.cumulative_mask = mask
        self.cumulative_replace = (1 - keep - mask).clamp(min=0.0) / K
        self.step_keep = torch.cat([torch.ones(1, dtype=f64), a[steps - 1, steps]])
        self.step_mask = torch.cat([torch.zeros(1, dtype=f64), c[steps - 1, steps]])
        self.step_replace = torch.cat([torch.zeros(1, dtype=f64), b[steps - 1, steps]])
        self._place(torch.device("cpu"), torch.float32)

    # ------------------------------------------------------------------ device
    def _place(self, device, dtype):
        self.device, self.dtype = torch.device(device), dtype
        for name, value in self._f64.items():
            setattr(self, name, value.to(device=self.device, dtype=dtype))

    def to(self, device=None, dtype=None) -> "Schedule":
        """Return a copy whose working tables live on ``device`` in ``dtype``."""
        new = object.__new__(Schedule)
        new.__dict__.update(self.__dict__)
        new._place(self.device if device is None else device, self.dtype if dtype is None else dtype)
        return new

    # ----------------------------------------------------------------- helpers
    def _times(self, t, batch: int) -> torch.Tensor:
        """int or (B,) tensor -> (B,) long tensor on the working device."""
        if not torch.is_tensor(t):
            t = torch.tensor(int(t))
        t = t.to(device=self.device, dtype=torch.long)
        return t.expand(batch) if t.dim() == 0 else t

    def _pair(self, name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at (s, t) per batch item, shaped (B, 1, 1) for broadcasting."""
        return getattr(self, name)[s, t].view(-1, 1, 1)

    def _push(self, log_x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Push a distribution over K+1 states at time s forward to time t (exact).

        Real target j: a·x_j + b·(mass on real states); mask: c·(real mass) + x_mask.
        """
        K = self.num_classes
        log_real, log_maskp = log_x[:, :K], log_x[:, K:]
        log_real_mass = torch.logsumexp(log_real, dim=1, keepdim=True)
        out_real = torch.logaddexp(log_real + self._pair("log_a", s, t), log_real_mass + self._pair("log_b", s, t))
        out_mask = torch.logaddexp(log_real_mass + self._pair("log_c", s, t), log_maskp)
        return torch.cat([out_real, out_mask], dim=1).clamp(LOG_ZERO, 0.0)

    # ----------------------------------------------------------------- forward
    def log_q_xt_given_x0(self, log_x0: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x0) for (B, K+1, L) log-probs of x0 -> (B, K+1, L) at time t."""
        t = self._times(t, log_x0.shape[0])
        return self._push(log_x0, torch.zeros_like(t), t)

    def log_q_xt_given_xtm1(self, log_xtm1: torch.Tensor, t) -> torch.Tensor:
        """One-step kernel q(x_t | x_{t-1}) applied to (B, K+1, L) log-probs at t-1."""
        t = self._times(t, log_xtm1.shape[0])
        return self._push(log_xtm1, t - 1, t)

    def q_sample(self, x0: torch.Tensor, t, generator: torch.Generator) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) for (B, L) real tokens; returns (B, L) long.

        Exact and cheap: with one uniform number per position, mask with
        probability γ̄_t, else draw a uniform real token with probability K·β̄_t
        (this includes x0 itself, giving it ᾱ_t + β̄_t in total), else keep x0.
        It has the same distribution as Gumbel-max over the K+1 marginal
        log-probabilities but needs no (B, K+1, L) noise tensor.
        """
        B, L = x0.shape
        K = self.num_classes
        t = self._times(t, B).cpu()
        mask_p = self.cumulative_mask[t].view(B, 1)
        replace_p = (self.cumulative_replace[t] * K).view(B, 1)
        u = torch.rand((B, L), generator=generator, device=generator.device, dtype=torch.float64)
        r = torch.randint(0, K, (B, L), generator=generator, device=generator.device)
        u, r = u.to(x0.device), r.to(x0.device)
        mask_p, replace_p = mask_p.to(x0.device), replace_p.to(x0.device)
        out = torch.where(u < mask_p + replace_p, r, x0.long())
        return torch.where(u < mask_p, torch.full_like(out, self.mask_index), out)

    # ----------------------------------------------------------------- reverse
    def log_p_prev(self, log_x0: torch.Tensor, x_t: torch.Tensor, t, s=None) -> torch.Tensor:
        """p(x_s | x_t) = Σ_x0 q(x_s | x_t, x0) p(x0 | x_t), for 0 <= s < t.

        Args:
            log_x0: (B, K, L) log p(x0 | x_t) over the real classes (the model's
                prediction, or a log one-hot of the true x0 for the true posterior).
            x_t: (B, L) long tokens at time t (mask = K).
            t: int or (B,) long, 1..T.
            s: int or (B,) long, default t - 1 (one step). Any s < t gives the
                exact Δ-step posterior; s = 0 returns p(x0 | x_t) itself.
        Returns:
            (B, K+1, L) log-probabilities of x_s.

        Evaluated without (K+1)² matrices, using Bayes
        q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0):
        (i) w(x0) ∝ p(x0) / q(x_t | x0), with normaliser Z;
        (ii) push w through q(x_s | x0);
        (iii) multiply by the likelihood q(x_t | x_s) and by Z.
        q(x_t | x0) as a function of x0 is (ᾱ_t + β̄_t) at x0 = x_t and β̄_t
        elsewhere for a real x_t, and γ̄_t everywhere for a masked x_t.
        """
        B, K, L = log_x0.shape
        if K != self.num_classes:
            raise ValueError(f"log_x0 has {K} classes, schedule has {self.num_classes}")
        t = self._times(t, B)
        s = t - 1 if s is None else self._times(s, B)
        zero = torch.zeros_like(t)
        is_mask = (x_t == self.mask_index).unsqueeze(1)  # (B, 1, L)
        j = x_t.clamp(max=K - 1).unsqueeze(1)  # (B, 1, L): x_t's class (any real one where masked)
        no_bump = torch.zeros((), dtype=self.dtype, device=log_x0.device)

        def per_position(s_, t_):
            """log q(x_t | x_s = k) as (base for every real k, extra at k = x_t), each (B, 1, L)."""
            base = torch.where(is_mask, self._pair("log_c", s_, t_), self._pair("log_b", s_, t_))
            bump = torch.where(is_mask, no_bump, self._pair("log_a_plus_b", s_, t_) - self._pair("log_b", s_, t_))
            return base, bump

        # (i) v = log p(x0) - log q(x_t | x0), normaliser Z.
        base_t, bump_t = per_position(zero, t)
        v = log_x0.to(self.dtype) - base_t
        v.scatter_add_(1, j, -bump_t)
        log_z = torch.logsumexp(v, dim=1, keepdim=True)
        # (ii)+(iii) with w = v / Z pushed through q(x_s | x0) and times the likelihood and Z:
        #   real k: lik(k) * (ᾱ_s v_k + β̄_s Z),   mask: lik(mask) * γ̄_s * Z.
        base_st, bump_st = per_position(s, t)
        #   log(ᾱ_s v_k + β̄_s Z) = log(ᾱ_s w_k + β̄_s) + log Z, evaluated with exp/log
        #   (much faster than logaddexp on CPU); w below e^-70 counts as 0.
        #   (out of place throughout, so the loss can backpropagate through it)
        w = (v - log_z).clamp(min=LOG_ZERO).exp()
        real = torch.addcmul(self._pair("log_b", zero, s).exp(), w, self._pair("log_a", zero, s).exp()).log()
        real = (real + (log_z + base_st)).scatter_add(1, j, bump_st)
        lik_mask = torch.where(is_mask, no_bump, torch.full_like(no_bump, LOG_ZERO))
        mask_row = self._pair("log_c", zero, s) + log_z + lik_mask
        return torch.cat([real, mask_row], dim=1).clamp(LOG_ZERO, 0.0)

    def log_weights_prev_given_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t, s) -> torch.Tensor:
        """q(x_s | x_t, x0) for one real x0 per position, as four unnormalised log weights.

        Args: x0 (B, L) real tokens, x_t (B, L) tokens at time t (mask = K), t and s
        ints or (B,) with 1 <= s < t. Returns (B, L, 4) in the working dtype:
        [every real class (spread evenly over the K), x0, x_t, the mask].

        q(x_s = k | x_t, x0) ∝ q(x_t | x_s = k) q(x_s = k | x0), and both factors
        are "keep, replace uniformly, or mask": with (a, b, c) the keep / per-class
        replace / mask probabilities from s to t and (A, B, C) from 0 to s,
          x_t masked:  real k: c (A [k = x0] + B),        mask: C;
          x_t = j:     real k: (a [k = j] + b)(A [k = x0] + B),  mask: 0.
        Expanded: every real class K·c·B (masked) or K·b·B (real x_t); extra at x0
        c·A, or (b + a [x0 = j])·A; extra at x_t: a·B (real x_t only); mask C (masked only).
        So each row's weights take one of three values per position: x_t masked,
        x_t = x0 (kept), x_t != x0 (replaced); :meth:`_prev_given_x0_cases` builds them.
        """
        cases = self._prev_given_x0_cases(t, s, x0.shape[0])  # (B, 3, 4)
        return cases.gather(1, self._case(x0, x_t).unsqueeze(-1).expand(-1, -1, 4))

    def _case(self, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """(B, L) long: 0 where x_t is masked, 1 where x_t = x0, 2 where x_t is another real class."""
        real = (x_t != self.mask_index).long()
        return real + real * (x0 != x_t).long()

    def _prev_given_x0_cases(self, t, s, batch: int) -> torch.Tensor:
        """(B, 3, 4): the four log weights of :meth:`log_weights_prev_given_x0` for the cases
        masked / kept / replaced, at each row's (s, t), in the working dtype and device."""
        t = self._times(t, batch)
        s = self._times(s, batch)
        zero = torch.zeros_like(t)

        def pair(name, s_, t_):
            return getattr(self, name)[s_, t_]

        la, lb, lapb, lc = pair("log_a", s, t), pair("log_b", s, t), pair("log_a_plus_b", s, t), pair("log_c", s, t)
        lA, lB, lC = pair("log_a", zero, s), pair("log_b", zero, s), pair("log_c", zero, s)
        never = torch.full_like(la, float("-inf"))
        log_k = math.log(self.num_classes)
        masked = torch.stack([log_k + lc + lB, lc + lA, never, lC], dim=1)
        kept = torch.stack([log_k + lb + lB, lapb + lA, la + lB, never], dim=1)
        replaced = torch.stack([log_k + lb + lB, lb + lA, la + lB, never], dim=1)
        return torch.stack([masked, kept, replaced], dim=1)

    def draw_prev_given_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t, s, generator) -> torch.Tensor:
        """Draw x_s ~ q(x_s | x_t, x0) for (B, L) real x0 and x_t; returns (B, L) long.

        With x0 drawn from p(x0 | x_t) first, x_s is an exact draw from the reverse
        step p(x_s | x_t) = Σ_x0 q(x_s | x_t, x0) p(x0 | x_t) (ancestral sampling
        through x0), at O(1) cost per position instead of the O(K) marginal of
        :meth:`log_p_prev`. Two float64 uniforms per position (from ``generator``,
        one or one per row): one picks a part of :meth:`log_weights_prev_given_x0`,
        the other the class of the evenly spread part. s = 0 returns x0.
        """
        B_, L = x0.shape
        K = self.num_classes
        s_ = self._times(s, B_)
        cases = self._prev_given_x0_cases(t, s_.clamp(min=1), B_)
        w = (cases - cases.amax(dim=-1, keepdim=True)).double().exp().cumsum(dim=-1)
        cum = w / w[..., -1:]  # (B, 3, 4) cumulative, each ending at exactly 1
        cum = cum.gather(1, self._case(x0, x_t).unsqueeze(-1).expand(-1, -1, 4))  # (B, L, 4)
        u = uniform((B_, L, 2), generator, torch.float64).to(x0.device)
        part = (cum < 1 - u[..., :1]).sum(dim=-1)  # 0..3, never a part of weight 0
        spread = (u[..., 1] * K).long().clamp_(max=K - 1)
        x_s = torch.where(part == 0, spread, torch.where(part == 1, x0, torch.where(part == 2, x_t, self.mask_index)))
        return torch.where((s_ == 0).view(-1, 1), x0, x_s)

    def pick(self, log_x0: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """log p(x0 | x_t) at the true x0 and at x_t (any class where masked), (B, 2, L), in one gather."""
        index = torch.stack([x0.long(), x_t.clamp(max=self.num_classes - 1).long()], dim=1)
        return log_x0.gather(1, index)

    def posterior_kl(self, log_x0: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t, s=None, picked=None) -> torch.Tensor:
        """KL(q(x_s | x_t, x0) ‖ p(x_s | x_t)) per position, (B, L), in closed form.

        ``log_x0`` (B, K, L) is the prediction log p(x0 | x_t), normalised over K;
        p(x_s | x_t) is its posterior (:meth:`log_p_prev`), q the true one for the
        real tokens ``x0`` (B, L). ``t`` int or (B,), 1 <= s < t (default t - 1).

        Neither posterior is built over the K + 1 states. Per position, with
        (a, b, c) the step s -> t, (A, B, C) the step 0 -> s, p = exp(log_x0):
          x_t masked:  p(x_s = k) = c (A p_k + B) / N for real k, C / N for the
                       mask, N = c (1 - C) + C;
          x_t = j:     with w = p / q(x_t | x0) normalised, w_k = ρ p_k (k != j),
                       w_j = ρ p_j B_t / (A_t + B_t), 1/ρ = (1 - p_j) + p_j B_t / (A_t + B_t):
                       p(x_s = k) = b (A w_k + B) / N (k != j), (a + b)(A w_j + B) / N at j,
                       0 at the mask, N = b (1 - C) + a (A w_j + B).
        So every real class but the special ones (x0, x_t) has p(x_s = k) =
        β (1 + (α/β) p_k) / N with per-position α, β, and q the same value u = β / Z
        there (:meth:`log_weights_prev_given_x0`, Z its normaliser). The KL is
        u [(K - n) log(N / Z) - Σ_generic log(1 + (α/β) p_k)] plus the special classes'
        terms: a few passes over the K classes forward and back. The only values taken
        from the prediction one by one are at x0 and x_t (``picked``, (B, 2, L), from
        :meth:`pick`): pass them when the caller has them (the loss does, for its nll),
        so that the backward scatters into the (B, K, L) gradient once.
        """
        B_, K, L = log_x0.shape
        t = self._times(t, B_)
        s = t - 1 if s is None else self._times(s, B_)
        zero = torch.zeros_like(t)

        def pair(name, s_, t_):
            return getattr(self, name)[s_, t_].view(-1, 1)  # (B, 1)

        la, lb, lapb, lc = pair("log_a", s, t), pair("log_b", s, t), pair("log_a_plus_b", s, t), pair("log_c", s, t)
        lA, lB, lC, l1mC = pair("log_a", zero, s), pair("log_b", zero, s), pair("log_c", zero, s), pair("log_1m_c", zero, s)
        log_share_b = pair("log_b", zero, t) - pair("log_a_plus_b", zero, t)  # log B_t / (A_t + B_t)

        log_x0 = log_x0.to(self.dtype)
        masked = x_t == self.mask_index  # (B, L)
        if picked is None:
            picked = self.pick(log_x0, x0, x_t)
        lp_0, lp_j = picked[:, 0].to(self.dtype), picked[:, 1].to(self.dtype)  # (B, L); lp_j meaningless where masked
        # real x_t: ρ and w_j, with 1 - p_j as -expm1(log p_j) (exact near p_j = 1)
        log_rho = -torch.log(-torch.expm1(lp_j) + lp_j.exp() * log_share_b.exp())
        log_wj_term = torch.logaddexp(lA + lp_j + log_rho + log_share_b, lB)  # log(A w_j + B)
        log_alpha = torch.where(masked, lc + lA, lb + lA + log_rho)
        log_beta = torch.where(masked, lc + lB, lb + lB)
        log_n = torch.where(masked, torch.logaddexp(lc + l1mC, lC), torch.logaddexp(lb + l1mC, la + log_wj_term))
        # the pass over the classes: log(1 + (α/β) p_k) (torch's log1p is ten times slower than log on a CPU)
        ratio = (log_alpha - log_beta).exp()
        lift_sum = torch.addcmul(torch.ones((), dtype=self.dtype), ratio.unsqueeze(1), log_x0.exp()).log().sum(dim=1)
        lift_0 = torch.log(1 + ratio * lp_0.exp())
        lift_j = torch.log(1 + ratio * lp_j.exp())

        # q: its four parts per position, normalised (Z)
        case = self._case(x0, x_t)
        log_w = self._prev_given_x0_cases(t, s, B_).gather(1, case.unsqueeze(-1).expand(-1, -1, 4))  # (B, L, 4)
        log_z = torch.logsumexp(log_w, dim=-1)
        q = (log_w - log_z.unsqueeze(-1)).exp()
        u, e0, ej = q[..., 0] / K, q[..., 1], q[..., 2]
        kept, replaced = case == 1, case == 2
        log_nz = log_n - log_z  # log(N / Z)

        # log p(x_s = ·) at the special classes
        log_p_j = lapb + log_wj_term - log_n  # x_t = j, real
        log_p_0 = torch.where(kept, log_p_j, log_beta + lift_0 - log_n)
        n_special = 1 + replaced.to(self.dtype)
        generic_lift = lift_sum - lift_0 - torch.where(replaced, lift_j, torch.zeros_like(lift_j))
        kl = u * ((K - n_special) * log_nz - generic_lift)
        q_0 = u + e0 + torch.where(kept, ej, torch.zeros_like(ej))
        kl = kl + torch.xlogy(q_0, q_0) - q_0 * log_p_0
        q_j = u + ej
        # (the mask adds nothing: where x_t is masked, N = Z and q and p give it the same C / N)
        return kl + torch.where(replaced, torch.xlogy(q_j, q_j) - q_j * log_p_j, torch.zeros_like(q_j))


# ---------------------------------------------------------------------- loss
def vlb_loss(
    log_x0_pred: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    aux_weight: float = 5e-4,
    pt: torch.Tensor | None = None,
) -> dict:
    """The VQ-Diffusion training loss and its named terms.

    Args:
        log_x0_pred: (B, K, L) model prediction log p_θ(x0 | x_t).
        x0: (B, L) true tokens; x_t: (B, L) noised tokens; t: (B,) long in 1..T.
        aux_weight: λ of the auxiliary x0 cross-entropy (5e-4 in the paper).
        pt: (B,) probability with which each t was drawn (importance
            sampling); the per-sample loss is divided by it. None = no division.

    Per sample b (sums over the L positions):
        vlb_b = Σ_L KL(q(x_{t-1}|x_t,x0) ‖ p_θ(x_{t-1}|x_t))  if t > 1
              = Σ_L -log p_θ(x0 | x_1)                       if t = 1
        aux_b = Σ_L -log p_θ(x0 | x_t)
        loss_b = (vlb_b + λ · ((1 - (t-1)/T) + 1) · aux_b) / pt_b
    The adaptive factor uses the reference code's 0-based step index t-1, so it
    is 2 at t = 1 and 1 + 1/T at t = T. The prediction is not clamped to
    LOG_ZERO here (the reference clamps it first): a true class predicted below
    e^-70 keeps its gradient instead of losing it at the floor. (Sampling with
    guidance does floor it: :func:`clipvqd.sampling.predict_x0`.)

    Returns a dict of scalars averaged over batch and positions:
        ``loss`` (to backpropagate), ``vlb``, ``aux`` (unweighted, no 1/pt),
    plus ``vlb_per_sample``: (B,) detached vlb_b, for TimestepSampler.update.
    """
    B, K, L = log_x0_pred.shape
    t = schedule._times(t, B)
    log_x0_pred = log_x0_pred.to(schedule.dtype)
    picked = schedule.pick(log_x0_pred, x0, x_t)  # at x0 and x_t: one gather (and one scatter back)
    kl = schedule.posterior_kl(log_x0_pred, x0, x_t, t, picked=picked)  # (B, L); meaningless where t = 1
    nll = -picked[:, 0]  # (B, L)
    vlb_b = torch.where((t == 1).view(B, 1), nll, kl).sum(dim=1)
    aux_b = nll.sum(dim=1)
    factor = 2.0 - (t - 1).to(log_x0_pred.dtype) / schedule.timesteps
    total_b = vlb_b + aux_weight * factor * aux_b
    if pt is not None:
        total_b = total_b / pt.to(total_b)
    return {
        "loss": total_b.mean() / L,
        "vlb": vlb_b.mean() / L,
        "aux": aux_b.mean() / L,
        "vlb_per_sample": vlb_b.detach(),
    }


# ------------------------------------------------------------- timestep sampler
class TimestepSampler:
    """Draws training timesteps: uniform first, then loss-aware importance sampling.

    Until every t has been seen more than ``warmup`` (10) times, t is uniform on
    1..T. Afterwards p_t ∝ sqrt(EMA of L_t²) + ``floor``, where the EMA keeps 0.9
    of the old value and takes 0.1 of the new. The training loss is divided by
    p_t (see :func:`vlb_loss`), which keeps it an unbiased estimate.

    State (``state_dict``) is two plain CPU tensors, safe for safetensors:
    ``loss_sq_ema`` (T,) float64 and ``count`` (T,) int64, indexed by t-1.
    """

    def __init__(self, timesteps: int, warmup: int = 10, floor: float = 1e-4):
        self.timesteps = int(timesteps)
        self.warmup = int(warmup)
        self.floor = float(floor)
        self.loss_sq_ema = torch.zeros(self.timesteps, dtype=torch.float64)
        self.count = torch.zeros(self.timesteps, dtype=torch.int64)

    def probabilities(self) -> torch.Tensor:
        """(T,) float64 probabilities of t = 1..T used by the next :meth:`sample`."""
        T = self.timesteps
        if not bool((self.count > self.warmup).all()):
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        weight = torch.sqrt(self.loss_sq_ema + 1e-10) + self.floor
        return weight / weight.sum()

    def sample(self, batch: int, generator: torch.Generator, device=None):
        """Return (t, pt): (B,) long timesteps in 1..T and their (B,) float32 probabilities."""
        p = self.probabilities()
        if generator.device.type != "cpu":
            raise ValueError("TimestepSampler.sample needs a CPU generator")
        index = torch.multinomial(p, batch, replacement=True, generator=generator)
        t, pt = index + 1, p[index].to(torch.float32)
        return t.to(device or "cpu"), pt.to(device or "cpu")

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold per-sample losses L (B,) observed at timesteps t (B,) into the EMA.

        Samples are applied in batch order, so repeated t in one batch give a
        deterministic result.
        """
        t = t.detach().long().cpu().view(-1)
        losses = losses.detach().to(torch.float64).cpu().view(-1)
        if t.numel() != losses.numel():
            raise ValueError("update needs one loss per timestep")
        for ti, li in zip(t.tolist(), losses.tolist()):
            if not 1 <= ti <= self.timesteps or not math.isfinite(li):
                continue
            i = ti - 1
            self.loss_sq_ema[i] = 0.9 * self.loss_sq_ema[i] + 0.1 * li * li
            self.count[i] += 1

    def state_dict(self) -> dict:
        return {"loss_sq_ema": self.loss_sq_ema.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        try:
            ema, count = state["loss_sq_ema"], state["count"]
        except KeyError as err:
            raise UserError(f"timestep sampler state is missing {err.args[0]!r}; the checkpoint is incomplete") from None
        if ema.shape != (self.timesteps,) or count.shape != (self.timesteps,):
            raise UserError(
                f"timestep sampler state has {ema.shape[0]} timesteps, the model uses {self.timesteps}"
            )
        self.loss_sq_ema = ema.detach().to(torch.float64).cpu().clone()
        self.count = count.detach().to(torch.int64).cpu().clone()
