"""Brute-force checks of the mask-and-replace math against dense (K+1)x(K+1)
transition matrices in float64, plus the loss and the timestep sampler."""

import pytest
import torch

from clipvqd.diffusion import LOG_ZERO, Schedule, TimestepSampler, log_onehot, vlb_loss
from clipvqd.errors import UserError

K, T, L = 5, 8, 3
SETTINGS = {
    # the released defaults: almost pure masking
    "default": dict(),
    # a schedule with plenty of uniform replacement, so replace terms matter
    "replace": dict(keep_start=0.9, keep_end=0.1, mask_start=0.05, mask_end=0.6),
}


def spec_arrays(settings):
    """ᾱ, γ̄ over t = 0..T straight from the spec's formulas (float64)."""
    s = dict(keep_start=0.99999, keep_end=0.000009, mask_start=0.000009, mask_end=0.99999)
    s.update(settings)
    keep = [1.0] + [s["keep_start"] + (i / (T - 1)) * (s["keep_end"] - s["keep_start"]) for i in range(T)]
    mask = [0.0] + [s["mask_start"] + (i / (T - 1)) * (s["mask_end"] - s["mask_start"]) for i in range(T)]
    return torch.tensor(keep, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)


def dense_step(settings):
    """Q[t] for t = 1..T: Q[t][i, j] = q(x_t = j | x_{t-1} = i), (K+1)x(K+1), from per-step α, γ, β."""
    keep, mask = spec_arrays(settings)
    mats = [torch.eye(K + 1, dtype=torch.float64)]
    for t in range(1, T + 1):
        a = keep[t] / keep[t - 1]
        g = 1 - (1 - mask[t]) / (1 - mask[t - 1])
        b = (1 - a - g) / K
        Q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
        Q[:K, :K] = b
        Q[:K, :K] += a * torch.eye(K, dtype=torch.float64)
        Q[:K, K] = g
        Q[K, K] = 1.0
        mats.append(Q)
    return mats


def dense_from_to(mats, s, t):
    out = torch.eye(K + 1, dtype=torch.float64)
    for u in range(s + 1, t + 1):
        out = out @ mats[u]
    return out


def dense_posterior(mats, p_x0, x_t, t, s):
    """Σ_x0 p(x0) q(x_t|x_s) q(x_s|x0) / q(x_t|x0) per position, via dense matrices.

    p_x0: (B, K, L) probabilities; x_t: (B, L). Returns (B, K+1, L) probabilities.
    """
    Qs, Qst, Qt = dense_from_to(mats, 0, s), dense_from_to(mats, s, t), dense_from_to(mats, 0, t)
    B = p_x0.shape[0]
    out = torch.zeros(B, K + 1, L, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            j = int(x_t[b, l])
            for i in range(K):
                if Qt[i, j] == 0:
                    continue
                out[b, :, l] += p_x0[b, i, l] * Qs[i, :] * Qst[:, j] / Qt[i, j]
    return out


def schedule(name):
    return Schedule(K, T, **SETTINGS[name]).to(dtype=torch.float64)


def assert_close_prob(log_ours, probs, rtol=1e-6):
    """Relative error < rtol wherever the true probability is not (nearly) 0.

    True zeros come back as leftovers of the log-0 floor exp(-70) ~ 4e-31,
    amplified at most by 1/q(x_t|x0); they must stay below 1e-18.
    """
    ours = log_ours.exp()
    real = probs > 1e-20
    rel = ((ours - probs).abs() / probs.clamp(min=1e-300))[real]
    assert rel.max() < rtol, rel.max()
    assert (ours[~real] < 1e-18).all(), ours[~real].max()


def random_p_x0(B, gen):
    return torch.softmax(torch.randn(B, K, L, generator=gen, dtype=torch.float64) * 2, dim=1)


def random_xt(B, gen, mask_share=0.4):
    x = torch.randint(0, K, (B, L), generator=gen)
    m = torch.rand(B, L, generator=gen) < mask_share
    return torch.where(m, torch.full_like(x, K), x)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_schedule_matches_spec(name):
    sch = schedule(name)
    keep, mask = spec_arrays(SETTINGS[name])
    assert torch.allclose(sch.cumulative_keep, keep, rtol=1e-12)
    assert torch.allclose(sch.cumulative_mask, mask, rtol=1e-12)
    assert torch.allclose(sch.cumulative_replace, (1 - keep - mask) / K, rtol=1e-9, atol=1e-18)
    # per-step arrays multiply back to the cumulative ones
    assert torch.allclose(torch.cumprod(sch.step_keep, 0), keep, rtol=1e-12)
    assert torch.allclose(torch.cumprod(1 - sch.step_mask, 0), 1 - mask, rtol=1e-12)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_marginals_equal_products_of_step_matrices(name):
    sch, mats = schedule(name), dense_step(SETTINGS[name])
    gen = torch.Generator().manual_seed(0)
    # arbitrary distributions over K+1 states, including mask mass
    x = torch.softmax(torch.randn(4, K + 1, L, generator=gen, dtype=torch.float64), dim=1)
    for t in range(1, T + 1):
        Qbar = dense_from_to(mats, 0, t)
        want = torch.einsum("bil,ij->bjl", x, Qbar)
        assert_close_prob(sch.log_q_xt_given_x0(x.log(), t), want)
        # one-hot rows of the cumulative matrix
        onehot = log_onehot(torch.arange(K + 1).view(K + 1, 1).expand(K + 1, L), K + 1, torch.float64)
        assert_close_prob(sch.log_q_xt_given_x0(onehot, t), Qbar.unsqueeze(-1).expand(K + 1, K + 1, L))
        # one step
        want1 = torch.einsum("bil,ij->bjl", x, mats[t])
        assert_close_prob(sch.log_q_xt_given_xtm1(x.log(), t), want1)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_posteriors_equal_dense_bayes(name):
    sch, mats = schedule(name), dense_step(SETTINGS[name])
    gen = torch.Generator().manual_seed(1)
    B = 3
    for t in range(1, T + 1):
        x_t = random_xt(B, gen)
        x0 = torch.randint(0, K, (B, L), generator=gen)
        p_onehot = torch.nn.functional.one_hot(x0, K).permute(0, 2, 1).double()
        p_pred = random_p_x0(B, gen)
        for s in range(0, t):
            for p in (p_pred, p_onehot):
                want = dense_posterior(mats, p, x_t, t, s)
                log_p = p.clamp(min=1e-300).log().clamp(min=LOG_ZERO)
                got = sch.log_p_prev(log_p, x_t, t, s=s)
                if bool(torch.isfinite(want).all()) and want.sum() > 0:
                    assert_close_prob(got, want)
                # normalised whenever x_t is reachable from the support of p
                reachable = want.sum(dim=1) > 0.5
                assert torch.allclose(got.exp().sum(1)[reachable], torch.ones(1, dtype=torch.float64), rtol=1e-9)
            if s == t - 1:  # default s is one step
                assert torch.equal(sch.log_p_prev(log_p, x_t, t), sch.log_p_prev(log_p, x_t, t, s=t - 1))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_posterior_given_one_x0_equals_dense_bayes(name):
    """q(x_s | x_t, x0) for one x0, from the four weights, against dense matrices: every pair
    (x_t, x0) at every 1 <= s < t."""
    sch, mats = schedule(name), dense_step(SETTINGS[name])
    pairs = [(j, i) for j in range(K + 1) for i in range(K)]
    x_t = torch.tensor([[j for j, _ in pairs]])
    x0 = torch.tensor([[i for _, i in pairs]])
    for t in range(2, T + 1):
        for s in range(1, t):
            Qs, Qst, Qt = dense_from_to(mats, 0, s), dense_from_to(mats, s, t), dense_from_to(mats, 0, t)
            w = sch.log_weights_prev_given_x0(x0, x_t, t, s).exp()[0]  # (pairs, 4)
            assert w.dtype == torch.float64
            for n, (j, i) in enumerate(pairs):
                want = Qs[i, :] * Qst[:, j] / Qt[i, j]
                got = torch.zeros(K + 1, dtype=torch.float64)
                got[:K] = w[n, 0] / K  # spread over the real classes
                got[i] += w[n, 1]
                got[j] += w[n, 2]  # 0 when x_t is the mask
                got[K] += w[n, 3]  # 0 when x_t is real
                got = got / got.sum()
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-15), (t, s, j, i)


def test_draw_given_one_x0_frequencies_and_seed():
    sch, mats = schedule("replace"), dense_step(SETTINGS["replace"])
    N = 40000
    for t, s, j, i in [(8, 3, K, 1), (8, 7, K, 4), (5, 2, 2, 2), (5, 2, 3, 0), (2, 1, 0, 4)]:
        x_t, x0 = torch.full((1, N), j), torch.full((1, N), i)
        draws = sch.draw_prev_given_x0(x0, x_t, t, s, torch.Generator().manual_seed(t * 10 + s))
        freq = torch.bincount(draws.view(-1), minlength=K + 1).double() / N
        Qs, Qst, Qt = dense_from_to(mats, 0, s), dense_from_to(mats, s, t), dense_from_to(mats, 0, t)
        want = Qs[i, :] * Qst[:, j] / Qt[i, j]
        assert (freq - want).abs().max() < 5 * (want * (1 - want) / N).sqrt().max() + 1e-3, (t, s, j, i)
        assert (freq[want == 0] == 0).all()
    x_t, x0 = random_xt(4, torch.Generator().manual_seed(1)), torch.randint(0, K, (4, L))
    a = sch.draw_prev_given_x0(x0, x_t, 6, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, sch.draw_prev_given_x0(x0, x_t, 6, 2, torch.Generator().manual_seed(3)))
    assert torch.equal(sch.draw_prev_given_x0(x0, x_t, 6, 0, torch.Generator().manual_seed(3)), x0)  # s = 0: x0


def test_posterior_with_batched_times():
    sch = schedule("replace")
    gen = torch.Generator().manual_seed(2)
    B = 4
    log_p = random_p_x0(B, gen).log()
    x_t = random_xt(B, gen)
    t = torch.tensor([2, 5, 8, 3])
    s = torch.tensor([0, 4, 1, 2])
    got = sch.log_p_prev(log_p, x_t, t, s=s)
    for b in range(B):
        one = sch.log_p_prev(log_p[b : b + 1], x_t[b : b + 1], int(t[b]), s=int(s[b]))
        assert torch.allclose(got[b : b + 1], one, rtol=1e-12, atol=0)


def test_s_zero_returns_prediction_and_mask_is_absorbing():
    sch = schedule("replace")
    gen = torch.Generator().manual_seed(3)
    log_p = random_p_x0(2, gen).log()
    x_t = random_xt(2, gen)
    out = sch.log_p_prev(log_p, x_t, 5, s=0)
    assert torch.allclose(out[:, :K].exp(), log_p.exp(), rtol=1e-9)
    assert (out[:, K] < -50).all()  # log-0 floor, up to rounding of the normaliser
    # a real x_t cannot come from a masked x_{t-1}
    real = x_t != K
    out1 = sch.log_p_prev(log_p, x_t, 5)
    assert (out1[:, K][real] < -50).all()  # log-0 floor, up to rounding of the normaliser
    # mask stays mask in the forward kernel
    mask_state = log_onehot(torch.full((1, L), K), K + 1, torch.float64)
    for t in range(1, T + 1):
        assert torch.allclose(sch.log_q_xt_given_x0(mask_state, t)[:, K].exp(), torch.ones(1, L, dtype=torch.float64))


def test_float32_default_schedule_normalises():
    sch = Schedule(16, 100)
    gen = torch.Generator().manual_seed(4)
    log_p = torch.log_softmax(torch.randn(2, 16, 10, generator=gen), dim=1)
    x_t = torch.randint(0, 17, (2, 10), generator=gen)
    for t in (1, 2, 50, 100):
        for s in {0, t - 1, t // 2}:
            if s < t:
                out = sch.log_p_prev(log_p, x_t, t, s=s)
                assert out.dtype == torch.float32
                assert torch.allclose(out.exp().sum(1), torch.ones(1), atol=1e-4)


def test_q_sample_matches_marginal():
    sch = schedule("replace")
    gen = torch.Generator().manual_seed(5)
    N = 40000
    x0 = torch.full((1, N), 2)
    for t in (1, 4, 8):
        x_t = sch.q_sample(x0, t, gen)
        freq = torch.bincount(x_t.view(-1), minlength=K + 1).double() / N
        want = sch.log_q_xt_given_x0(log_onehot(torch.tensor([[2]]), K + 1, torch.float64), t).exp().view(-1)
        assert (freq - want).abs().max() < 4 * (want * (1 - want) / N).sqrt().max() + 1e-3
    a = sch.q_sample(x0, 4, torch.Generator().manual_seed(9))
    b = sch.q_sample(x0, 4, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_invalid_schedule_is_a_user_error():
    with pytest.raises(UserError):
        Schedule(4, 10, keep_start=0.5, keep_end=0.9)  # keep rising
    with pytest.raises(UserError):
        Schedule(4, 10, keep_end=0.6, mask_end=0.6)  # keep + mask > 1
    # keep + mask = 1 at both ends: pure masking, no replacement left for the posterior to divide by
    with pytest.raises(UserError, match="no uniform replacement"):
        Schedule(4, 10, keep_start=0.9, keep_end=0.0001, mask_start=0.1, mask_end=0.9999)
    Schedule(4096, 100)  # the defaults: replacement at least e^-27 per class


def test_loss_is_zero_for_a_perfect_prediction():
    sch = Schedule(K, T)
    gen = torch.Generator().manual_seed(6)
    B = 6
    x0 = torch.randint(0, K, (B, L), generator=gen)
    for t in range(1, T + 1):
        tt = torch.full((B,), t)
        x_t = sch.q_sample(x0, tt, gen)
        terms = vlb_loss(log_onehot(x0, K), x0, x_t, tt, sch)
        for name in ("loss", "vlb", "aux"):
            assert abs(float(terms[name])) < 1e-5, (t, name, terms[name])
    # and clearly positive for a wrong one
    wrong = log_onehot((x0 + 1) % K, K)
    terms = vlb_loss(wrong, x0, sch.q_sample(x0, 5, gen), torch.full((B,), 5), sch)
    assert float(terms["loss"]) > 1.0


def test_loss_terms_match_hand_computation():
    sch = schedule("replace")
    gen = torch.Generator().manual_seed(7)
    B = 4
    x0 = torch.randint(0, K, (B, L), generator=gen)
    t = torch.tensor([1, 3, 6, 8])
    x_t = sch.q_sample(x0, t, gen)
    log_pred = torch.log_softmax(torch.randn(B, K, L, generator=gen, dtype=torch.float64), 1)
    pt = torch.tensor([0.1, 0.2, 0.3, 0.4])
    terms = vlb_loss(log_pred, x0, x_t, t, sch, aux_weight=0.01, pt=pt)
    mats = dense_step(SETTINGS["replace"])
    total, vlb_sum = 0.0, []
    for b in range(B):
        tb = int(t[b])
        nll = -log_pred[b].gather(0, x0[b : b + 1]).sum()
        if tb == 1:
            vlb = nll
        else:
            onehot = torch.nn.functional.one_hot(x0[b : b + 1], K).permute(0, 2, 1).double()
            q = dense_posterior(mats, onehot, x_t[b : b + 1], tb, tb - 1)
            p = dense_posterior(mats, log_pred[b : b + 1].exp(), x_t[b : b + 1], tb, tb - 1)
            keep = q > 0
            vlb = (q[keep] * (q[keep].log() - p[keep].log())).sum()
        vlb_sum.append(float(vlb))
        factor = (1 - (tb - 1) / T) + 1
        total += (vlb + 0.01 * factor * nll) / pt[b]
    assert torch.allclose(terms["vlb_per_sample"], torch.tensor(vlb_sum, dtype=torch.float64), rtol=1e-6)
    assert abs(float(terms["loss"]) - float(total) / (B * L)) < 1e-6 * abs(float(total))


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("sharpness", [1.0, 30.0])  # spread predictions, and nearly one-hot ones (p_j -> 1)
def test_posterior_kl_and_its_gradient_equal_the_dense_reference(name, sharpness):
    """The closed-form KL against Σ q (log q - log p) of the dense Bayes posteriors, at every t > 1
    and both kinds of x_t, and its gradient against autograd through the dense reference."""
    sch, mats = schedule(name), dense_step(SETTINGS[name])
    gen = torch.Generator().manual_seed(8)
    B = 3
    for t in range(2, T + 1):
        x0 = torch.randint(0, K, (B, L), generator=gen)
        x_t = random_xt(B, gen, mask_share=0.5)
        x_t[0, 0] = x0[0, 0]  # a kept token and (likely) a replaced one
        logits = (torch.randn(B, K, L, generator=gen, dtype=torch.float64) * sharpness).requires_grad_()
        log_pred = logits.log_softmax(1)
        got = sch.posterior_kl(log_pred, x0, x_t, t)
        onehot = torch.nn.functional.one_hot(x0, K).permute(0, 2, 1).double()
        q = dense_posterior(mats, onehot, x_t, t, t - 1)
        p = dense_posterior(mats, log_pred.exp(), x_t, t, t - 1)
        want = torch.where(q > 0, q * (q.clamp(min=1e-300).log() - p.clamp(min=1e-300).log()), 0.0).sum(1)
        assert torch.allclose(got, want, rtol=1e-7, atol=1e-12), (t, (got - want).abs().max())
        weights = torch.randn(B, L, generator=gen, dtype=torch.float64)
        g_got, = torch.autograd.grad((got * weights).sum(), logits, retain_graph=True)
        g_want, = torch.autograd.grad((want * weights).sum(), logits)
        assert torch.allclose(g_got, g_want, rtol=1e-6, atol=1e-10), (t, (g_got - g_want).abs().max())


def test_timestep_sampler_uniform_then_importance():
    T_ = 5
    ts = TimestepSampler(T_)
    gen = torch.Generator().manual_seed(0)
    t, pt = ts.sample(1000, gen)
    assert t.min() >= 1 and t.max() <= T_ and torch.allclose(pt, torch.full_like(pt, 1 / T_))
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    for _ in range(10):
        ts.update(torch.arange(1, T_ + 1), losses)
    assert torch.allclose(ts.probabilities(), torch.full((T_,), 1 / T_, dtype=torch.float64))  # seen 10, not > 10
    ts.update(torch.arange(1, T_ + 1), losses)
    ema = losses.double() ** 2 * (1 - 0.9**11)
    w = (ema + 1e-10).sqrt() + 1e-4
    assert torch.allclose(ts.probabilities(), w / w.sum(), rtol=1e-12)
    t, pt = ts.sample(20000, gen)
    freq = torch.bincount(t - 1, minlength=T_).double() / 20000
    assert (freq - w / w.sum()).abs().max() < 0.02
    assert torch.allclose(pt.double(), (w / w.sum())[t - 1], rtol=1e-6)


def test_timestep_sampler_state_round_trip_and_determinism():
    ts = TimestepSampler(7)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        t, _ = ts.sample(8, gen)
        ts.update(t, t.double() * 0.5)
    state = ts.state_dict()
    assert set(state) == {"loss_sq_ema", "count"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = TimestepSampler(7)
    other.load_state_dict({k: v.clone() for k, v in state.items()})
    a = ts.sample(64, torch.Generator().manual_seed(42))
    b = other.sample(64, torch.Generator().manual_seed(42))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ts.sample(64, torch.Generator().manual_seed(43))
    assert not torch.equal(a[0], c[0])
    with pytest.raises(UserError):
        TimestepSampler(8).load_state_dict(state)


def test_loss_backpropagates():
    sch = Schedule(K, T)
    gen = torch.Generator().manual_seed(8)
    B = 4
    x0 = torch.randint(0, K, (B, L), generator=gen)
    t = torch.tensor([1, 2, 5, 8])
    x_t = sch.q_sample(x0, t, gen)
    logits = torch.randn(B, K, L, generator=gen, requires_grad=True)
    terms = vlb_loss(logits.log_softmax(1), x0, x_t, t, sch, pt=torch.full((B,), 1 / T))
    terms["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert not terms["vlb_per_sample"].requires_grad
