"""Guidance, truncation and the reverse sampling loop, with tiny seeded denoisers."""

import pytest
import torch

from clipvqd.diffusion import Schedule
from clipvqd.errors import UserError
from clipvqd.sampling import draw_truncated, guide, guided_log_x0, predict_x0, sample, timestep_subset, truncate
from clipvqd.transformer import Denoiser, DenoiserConfig

K, L, C = 7, 6, 4


class RandomDenoiser:
    """A deterministic stand-in: log p(x0) a fixed function of tokens, t and cond; counts calls."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tok = torch.randn(K + 1, K, generator=g)
        self.cond = torch.randn(C, K, generator=g)
        self.calls, self.batches = 0, []

    def __call__(self, tokens, t, cond):
        self.calls += 1
        self.batches.append(tokens.shape[0])
        logits = self.tok[tokens] + (cond @ self.cond)[:, None, :] + 0.05 * t.view(-1, 1, 1)
        return logits.log_softmax(-1).transpose(1, 2)


class ConstantDenoiser:
    """Always predicts code ``code`` with probability ~1."""

    def __init__(self, code):
        self.code = code

    def __call__(self, tokens, t, cond):
        logits = torch.full((tokens.shape[0], tokens.shape[1], K), -50.0)
        logits[..., self.code] = 0.0
        return logits.log_softmax(-1).transpose(1, 2)


def test_guide_scale_one_and_normalisation():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, K, L, generator=g).log_softmax(1)
    u = torch.randn(3, K, L, generator=g).log_softmax(1)
    assert torch.equal(guide(c, u, 1.0), c)
    for s in (0.0, 1.5, 3.0, 10.0):
        out = guide(c, u, s)
        assert torch.allclose(out.logsumexp(1), torch.zeros(3, L), atol=1e-5)
        assert (out <= 0).all() and (out >= -70).all()
    # the formula itself, at a mild scale where no clamp acts
    want = (u + 1.5 * (c - u)).log_softmax(1)
    assert torch.allclose(guide(c, u, 1.5), want, atol=1e-6)
    assert torch.allclose(guide(c, u, 0.0), u, atol=1e-6)


def test_guidance_ignores_differences_below_log_zero():
    # a class both halves rule out (conditional -100, unconditional -160 against the top's 0):
    # on the raw numbers u + 3 (c - u) would put it 20 nats ABOVE the top class
    c = torch.tensor([0.0, -100.0]).log_softmax(0)
    u = torch.tensor([0.0, -160.0]).log_softmax(0)

    def denoiser(tokens, t, cond):  # rows with cond 1 are conditional, 0 the null condition
        return torch.where(cond[:, :1, None] > 0, c.view(1, 2, 1), u.view(1, 2, 1)).expand(-1, -1, tokens.shape[1]).clone()

    out = predict_x0(denoiser, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, dtype=torch.long),
                     torch.ones(1, 1), guidance=3.0, null_cond=torch.zeros(1))
    assert (out[0].argmax(0) == 0).all()
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, -70.0]), atol=1e-6)


@pytest.mark.parametrize("r", [0.01, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("K_", [5, 300, 2048])
@pytest.mark.parametrize("spread", [0.0, 0.05, 2.0, 8.0, "mixed"])  # uniform, flat, medium, peaked, per position
def test_truncate_brute_force(r, K_, spread):
    """Against a float64 sort: the fewest most likely classes whose mass reaches r."""
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(2, 1, 9, generator=g) * 8 if spread == "mixed" else spread
    log_p = (torch.randn(2, K_, 9, generator=g) * scale).log_softmax(1)
    out = truncate(log_p, r)
    for b in range(2):
        for l in range(9):
            p = log_p[b, :, l].double().exp()
            sorted_p, order = p.sort(descending=True)
            n = int(((sorted_p.cumsum(0) - sorted_p) < r).sum().clamp(min=1))
            tau = log_p[b, order[n - 1], l]
            keep = set((log_p[b, :, l] >= tau).nonzero().view(-1).tolist())  # ties with the last kept stay
            kept = out[b, :, l] > -70
            assert set(kept.nonzero().view(-1).tolist()) == keep
            assert torch.equal(out[b, kept, l], log_p[b, kept, l])
            assert int(p.argmax()) in keep and float(p[kept].sum()) >= r - 1e-6
    assert torch.equal(truncate(log_p, 1.0), log_p)
    # r <= 0 still keeps exactly the top class (all of them when every class ties)
    only_top = (truncate(log_p, 0.0) > -70).sum(1)
    assert torch.equal(only_top, torch.full((2, 9), K_ if spread == 0.0 else 1))


def test_truncate_in_the_models_layout_and_with_a_deep_tail():
    """(B, K, L) views of a (B, L, K) tensor (the denoiser's output) and classes far
    below the top (30 nats) give the same sets as a float64 sort."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 64, generator=g) * 3
    logits[:, :, :20] -= 30  # a tail 30 nats down
    log_p = logits.log_softmax(-1).transpose(1, 2)
    for r in (0.5, 0.99999):
        out = truncate(log_p, r)
        assert torch.equal(out, truncate(log_p.contiguous(), r))
        for b in range(3):
            for l in range(7):
                p = log_p[b, :, l].double().exp()
                sorted_p, order = p.sort(descending=True)
                n = int(((sorted_p.cumsum(0) - sorted_p) < r).sum().clamp(min=1))
                assert set((out[b, :, l] > -70).nonzero().view(-1).tolist()) == set(order[:n].tolist())


def kept_set(log_p_column: torch.Tensor, r: float) -> torch.Tensor:
    """Brute force in float64: the fewest most likely classes whose mass reaches r, plus ties (a bool mask)."""
    p = log_p_column.double().exp()
    sorted_p, order = p.sort(descending=True)
    n = int(((sorted_p.cumsum(0) - sorted_p) < r).sum().clamp(min=1))
    return log_p_column >= log_p_column[order[n - 1]]


@pytest.mark.parametrize("r", [0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("spread", [0.0, 0.05, 2.0, 8.0])
@pytest.mark.parametrize("tries", [1, 4])
def test_draw_truncated_has_the_truncated_distribution(r, spread, tries):
    """Every draw lies in truncate's set, and the draws' frequencies are p on that set, renormalised
    (binomial bounds). tries=1 with a small r sends most positions to the fallback draw."""
    g = torch.Generator().manual_seed(4)
    K_, N = 12, 30000
    column = torch.randn(K_, generator=g) * spread
    column[3] = column[5]  # a tie
    column = column.log_softmax(0)
    log_p = column.view(1, K_, 1).expand(2, K_, N // 2)
    draws = draw_truncated(log_p, r, torch.Generator().manual_seed(1), tries=tries)
    assert draws.shape == (2, N // 2) and draws.dtype == torch.long
    keep = kept_set(column, r) if r < 1 else torch.ones(K_, dtype=torch.bool)
    assert keep.equal(truncate(column.view(1, K_, 1), r)[0, :, 0] > -70)
    freq = torch.bincount(draws.view(-1), minlength=K_).double() / N
    assert (freq[~keep] == 0).all()
    want = torch.where(keep, column.double().exp(), 0.0)
    want = want / want.sum()
    assert (freq - want).abs().max() < 5 * (want * (1 - want) / N).sqrt().max() + 1e-3
    again = draw_truncated(log_p, r, torch.Generator().manual_seed(1), tries=tries)
    assert torch.equal(draws, again)


@pytest.mark.parametrize("r, tries", [(0.3, 1), (0.3, 4), (0.9, 2), (0.9, 4), (1.0, 4)])
def test_draw_truncated_is_its_definition_position_by_position(r, tries):
    """The exact draws, not only their law: with the same uniforms (``tries`` + 1 a position, taken up
    front), each position takes the first of its tries whose inverse-CDF class (float64 cumulative sum)
    is in the brute-force kept set, else the draw from the kept set with the last uniform. Pins the
    vectorised bookkeeping (which rows retry, which try wins) to a plain loop."""
    from clipvqd.diffusion import uniform

    g = torch.Generator().manual_seed(11)
    B_, K_, L_ = 2, 40, 60
    logits = torch.randn(B_, L_, K_, generator=g) * torch.rand(B_, L_, 1, generator=g) * 6
    log_p = logits.log_softmax(-1).transpose(1, 2)
    got = draw_truncated(log_p, r, torch.Generator().manual_seed(3), tries=tries)
    u = uniform((B_, L_, tries + 1), torch.Generator().manual_seed(3), torch.float64)
    for b in range(B_):
        for l in range(L_):
            column = log_p[b, :, l]
            p = column.exp()
            cum = p.double().cumsum(0)
            keep = kept_set(column, r) if r < 1 else torch.ones(K_, dtype=torch.bool)
            want = None
            for i in range(tries if r < 1 else 1):
                x = min(int(torch.searchsorted(cum, (1 - u[b, l, i]) * cum[-1])), K_ - 1)
                if keep[x]:
                    want = x
                    break
            if want is None:
                cum_set = torch.where(keep, p, 0.0).double().cumsum(0)
                want = min(int(torch.searchsorted(cum_set, (1 - u[b, l, tries]) * cum_set[-1])), K_ - 1)
            assert got[b, l] == want, (b, l)


def test_mass_above_is_the_mass_strictly_above_brute_force():
    """_mass_above (the kept-set check's one pass) against Σ_k p_k [p_k > p_x] summed by brute force,
    with exact ties (the tied classes must not count) and p_x the top or the bottom class."""
    from clipvqd.sampling import _mass_above

    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 6, (40, 9), generator=g).double()  # many ties
    p = p / p.sum(dim=1, keepdim=True).clamp(min=1)
    picks = torch.randint(0, 9, (40, 3), generator=g)
    picks[0] = p[0].argmax()
    picks[1] = p[1].argmin()
    p_x = p.gather(1, picks).unsqueeze(-1)  # (40, 3, 1): three candidates a row, as in the retries
    got = _mass_above(p.unsqueeze(1) - p_x, p_x, dim=2).squeeze(-1)
    want = torch.tensor([[sum(v for v in p[i].tolist() if v > p[i, k].item()) for k in picks[i].tolist()]
                         for i in range(40)], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert got[0].eq(0).all()  # nothing is above the top class
    assert torch.allclose(got[:, :1], _mass_above(p - p_x[:, 0], p_x[:, 0], dim=1), atol=0, rtol=0)


def test_draw_truncated_per_position_sets():
    """Positions with different distributions (the model's (B, L, K) layout seen as (B, K, L)): each
    draw lies in its own position's set."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50, 300, generator=g) * torch.rand(3, 50, 1, generator=g) * 8
    log_p = logits.log_softmax(-1).transpose(1, 2)
    for r in (0.2, 0.9):
        draws = draw_truncated(log_p, r, torch.Generator().manual_seed(2), tries=2)
        for b in range(3):
            for l in range(50):
                assert kept_set(log_p[b, :, l], r)[draws[b, l]]


def test_timestep_subset():
    assert timestep_subset(100, 100) == list(range(100, 0, -1))
    assert timestep_subset(100, 1) == [100]
    for steps in (2, 7, 10, 25, 50, 99):
        ts = timestep_subset(100, steps)
        assert len(ts) == steps and ts[0] == 100 and ts[-1] == 1
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(UserError):
        timestep_subset(100, 0)
    with pytest.raises(UserError):
        timestep_subset(100, 101)


def run(denoiser, steps, seed=0, B=3, T=10, **kw):
    sch = Schedule(K, T)
    cond = torch.randn(B, C, generator=torch.Generator().manual_seed(99))
    return sample(denoiser, sch, cond, L, steps=steps, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("steps", [1, 2, 7, 10])
def test_no_mask_survives_and_seed_determinism(steps):
    kw = dict(guidance=2.0, truncation=0.8, null_cond=torch.zeros(C))
    a = run(RandomDenoiser(), steps, seed=3, **kw)
    assert a.shape == (3, L) and a.dtype == torch.long
    assert (a >= 0).all() and (a < K).all()
    assert torch.equal(a, run(RandomDenoiser(), steps, seed=3, **kw))
    # without guidance and truncation the draws are spread: other seeds differ
    plain = [run(RandomDenoiser(), steps, seed=s) for s in range(3, 7)]
    assert any(not torch.equal(plain[0], d) for d in plain[1:])


def test_no_mask_with_default_T():
    tokens = run(RandomDenoiser(), 100, T=100, B=2)
    assert (tokens < K).all()


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_constant_denoiser_gives_its_code(steps):
    assert (run(ConstantDenoiser(4), steps) == 4).all()
    assert (run(ConstantDenoiser(0), steps, guidance=3.0, truncation=0.9, null_cond=torch.zeros(C)) == 0).all()


def test_guidance_batches_one_forward_per_step():
    d = RandomDenoiser()
    run(d, 5, B=3, guidance=3.0, null_cond=torch.zeros(C))
    assert d.calls == 5 and d.batches == [6] * 5
    d1 = RandomDenoiser()
    run(d1, 5, B=3)
    assert d1.calls == 5 and d1.batches == [3] * 5
    with pytest.raises(UserError):
        run(RandomDenoiser(), 5, guidance=3.0)  # no null condition


def test_guidance_pushes_away_from_the_null_condition_half():
    """predict_x0 must guide with the conditional half as c and the null half as u: here the
    condition favours class 0 (0.6 / 0.4) and the null condition class 1 (0.3 / 0.7), so scale 3
    gives u + 3 (c - u) over the two classes, brute force in float64 (swapped halves favour class 1)."""
    null = torch.zeros(C)

    class TwoWay:
        def __call__(self, tokens, t, cond):
            is_null = (cond == 0).all(dim=1).view(-1, 1, 1)
            p = torch.where(is_null, torch.tensor([0.3, 0.7]).view(1, 2, 1), torch.tensor([0.6, 0.4]).view(1, 2, 1))
            return p.log().expand(tokens.shape[0], 2, tokens.shape[1]).clone()

    x = torch.full((2, 3), 2)
    out = predict_x0(TwoWay(), x, torch.tensor([5, 5]), torch.ones(2, C), guidance=3.0, null_cond=null)
    c, u = torch.tensor([0.6, 0.4], dtype=torch.float64).log(), torch.tensor([0.3, 0.7], dtype=torch.float64).log()
    g = u + 3 * (c - u)
    expected = (g - g.logsumexp(0)).float()
    assert torch.allclose(out, expected.view(1, 2, 1).expand(2, 2, 3), atol=1e-6)
    assert expected[0] > expected[1]


def test_delta_step_with_all_steps_equals_one_step_loop():
    T, B = 10, 3
    sch = Schedule(K, T)
    d = RandomDenoiser()
    cond = torch.randn(B, C, generator=torch.Generator().manual_seed(99))
    fast = sample(d, sch, cond, L, steps=T, generator=torch.Generator().manual_seed(5))
    # the textbook loop: x0 ~ p(x0 | x_t), then x_{t-1} ~ q(x_{t-1} | x_t, x0) at t = T..2, x0 itself at t = 1
    g = torch.Generator().manual_seed(5)
    x = torch.full((B, L), K)
    for t in range(T, 0, -1):
        tt = torch.full((B,), t)
        x0 = draw_truncated(d(x, tt, cond), 1.0, g)
        x = x0 if t == 1 else sch.draw_prev_given_x0(x0, x, tt, t - 1, g)
    assert torch.equal(fast, x)


@pytest.mark.parametrize("steps, guidance, truncation", [(4, 1.0, 1.0), (4, 3.0, 0.6), (2, 2.0, 0.9)])
def test_sampler_distribution_equals_the_exact_reverse_chain(steps, guidance, truncation):
    """The whole sampler against brute force: with one position (L = 1) the reverse chain has K + 1
    states, and its exact law is a product of the posterior matrices p(x_s | x_t) (log_p_prev, itself
    checked against dense Bayes) from the guided, truncated prediction. 24,000 independent samples
    (one condition repeated) must match the final distribution (binomial bounds)."""
    T, N = 6, 24000
    sch = Schedule(K, T, keep_start=0.9, keep_end=0.05, mask_start=0.05, mask_end=0.9)  # replacement matters
    d = RandomDenoiser(seed=3)
    cond = torch.randn(1, C, generator=torch.Generator().manual_seed(7))
    null = torch.zeros(C)
    draws = sample(d, sch, cond.expand(N, C), 1, steps=steps, guidance=guidance, truncation=truncation,
                   generator=torch.Generator().manual_seed(11), null_cond=null)
    freq = torch.bincount(draws.view(-1), minlength=K).double() / N
    law = torch.zeros(K + 1, dtype=torch.float64)
    law[K] = 1.0  # all-mask at T
    times = timestep_subset(T, steps) + [0]
    states = torch.arange(K + 1).view(K + 1, 1)  # every state of the one position, as a batch
    for t, s_ in zip(times, times[1:]):
        tt = torch.full((K + 1,), t)
        log_x0 = predict_x0(d, states, tt, cond.expand(K + 1, C), guidance, truncation, null)
        step = sch.to(dtype=torch.float64).log_p_prev(log_x0.double(), states, tt, s=s_).exp()[:, :, 0]  # (from, to)
        law = law @ (step / step.sum(1, keepdim=True))
    assert law[K] < 1e-12  # nothing left masked
    want = law[:K]
    assert (freq - want).abs().max() < 5 * (want * (1 - want) / N).sqrt().max() + 2e-3


def test_sample_with_a_real_denoiser():
    torch.manual_seed(0)
    cfg = DenoiserConfig(num_classes=K, height=2, width=3, layers=1, dim=16, heads=2, cond_dim=C, timesteps=10)
    model = Denoiser(cfg).eval()
    sch = Schedule(K, 10)
    cond = torch.randn(4, C, generator=torch.Generator().manual_seed(1))
    out = sample(model, sch, cond, cfg.seq_len, steps=4, guidance=3.0, truncation=0.9,
                 generator=torch.Generator().manual_seed(2), null_cond=model.null_condition(1)[0])
    assert out.shape == (4, 6) and (out < K).all()


def test_sample_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = DenoiserConfig(num_classes=K, height=2, width=3, layers=1, dim=16, heads=2, cond_dim=C, timesteps=10)
    model = Denoiser(cfg).eval()
    cond = torch.randn(2, C, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample(model, Schedule(K, 10), cond, cfg.seq_len, steps=3, guidance=2.0, truncation=0.9,
                     generator=torch.Generator().manual_seed(2), null_cond=model.null_condition(1)[0])
    assert out.shape == (2, 6) and (out < K).all()


def test_one_generator_per_row_makes_rows_independent_of_the_batch():
    sch = Schedule(K, 10)
    cond = torch.randn(3, C, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=4, guidance=2.0, truncation=0.95, null_cond=torch.zeros(C))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = sample(RandomDenoiser(), sch, cond, L, generator=gens([10, 11, 12]), **kw)
    alone = sample(RandomDenoiser(), sch, cond[1:2], L, generator=gens([11]), **kw)
    assert torch.equal(batch[1:2], alone)
    other = sample(RandomDenoiser(), sch, cond, L, generator=gens([10, 99, 12]), **kw)
    assert torch.equal(other[0], batch[0]) and torch.equal(other[2], batch[2])
