"""The denoising transformer: paper-size parameter counts (on the meta device),
output shapes and normalisation, conditioning is wired, bf16 autocast."""

import inspect

import pytest
import torch

import clipvqd.transformer as transformer
from clipvqd.errors import UserError
from clipvqd.transformer import Denoiser, DenoiserConfig

PAPER = dict(num_classes=4096, height=16, width=16, layers=24, dim=512, heads=16, cond_dim=512, timesteps=100)


def expected_params(K, h, w, layers, D, cond, T, mlp, ratio=4):
    """Parameter count written out from the architecture description."""
    attn = D * 3 * D + 3 * D + D * D + D
    ada_t = T * D + D * 2 * D + 2 * D
    ada_c = cond * D + D + D * 2 * D + 2 * D
    if mlp == "conv":
        mlp_n = D * ratio * D * 9 + ratio * D + ratio * D * D * 9 + D
    elif mlp == "dwconv":  # fc1, one 3x3 filter and bias per hidden channel, fc2
        mlp_n = D * ratio * D + ratio * D + ratio * D * 9 + ratio * D + ratio * D * D + D
    else:
        mlp_n = D * ratio * D + ratio * D + ratio * D * D + D
    per_block = attn + ada_t + ada_c + mlp_n
    embeds = (K + 1) * D + h * D + w * D
    head = 2 * D + D * K + K
    return layers * per_block + embeds + head + cond


@pytest.mark.parametrize("mlp,paper_count", [("conv", 515e6), ("dwconv", 113e6), ("linear", 113e6)])
def test_paper_parameter_count(mlp, paper_count):
    with torch.device("meta"):
        model = Denoiser(DenoiserConfig(mlp=mlp, **PAPER))
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(4096, 16, 16, 24, 512, 512, 100, mlp)
    assert abs(n - paper_count) / paper_count < 0.02, n


def tiny(mlp="conv", **kw):
    cfg = dict(num_classes=11, height=3, width=4, layers=2, dim=32, heads=4, cond_dim=8, timesteps=10, mlp=mlp)
    cfg.update(kw)
    return DenoiserConfig(**cfg)


@pytest.mark.parametrize("mlp", ["conv", "dwconv", "linear"])
def test_output_shape_and_normalisation(mlp):
    torch.manual_seed(0)
    cfg = tiny(mlp)
    model = Denoiser(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    B = 5
    tokens = torch.randint(0, cfg.num_classes + 1, (B, cfg.seq_len), generator=gen)
    t = torch.randint(1, cfg.timesteps + 1, (B,), generator=gen)
    cond = torch.randn(B, cfg.cond_dim, generator=gen)
    out = model(tokens, t, cond)
    assert out.shape == (B, cfg.num_classes, cfg.seq_len) and out.dtype == torch.float32
    assert torch.allclose(out.logsumexp(dim=1), torch.zeros(B, cfg.seq_len), atol=1e-5)
    assert (out <= 0).all()
    # batch items are independent
    assert torch.allclose(model(tokens[:2], t[:2], cond[:2]), out[:2], atol=1e-5)


def test_conditioning_time_and_all_positions_are_used():
    torch.manual_seed(1)
    cfg = tiny("conv")
    model = Denoiser(cfg).eval()
    with torch.no_grad():  # the zero-initialised-bias defaults make the effects small; enlarge them
        for p in model.parameters():
            p.mul_(10)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.num_classes + 1, (2, cfg.seq_len), generator=gen)
    t = torch.tensor([3, 7])
    cond = torch.randn(2, cfg.cond_dim, generator=gen)
    base = model(tokens, t, cond)
    assert not torch.allclose(model(tokens, t + 1, cond), base, atol=1e-4)
    assert not torch.allclose(model(tokens, t, cond + 1), base, atol=1e-4)
    # non-causal: changing the last token changes the first position's output
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % (cfg.num_classes + 1)
    assert not torch.allclose(model(changed, t, cond)[:, :, 0], base[:, :, 0], atol=1e-4)


def test_init_and_null_condition():
    torch.manual_seed(2)
    model = Denoiser(tiny("linear", dim=64, layers=4))
    w = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(float(w.std()) - 0.02) < 0.002
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    null = model.null_condition(3)
    assert null.shape == (3, 8) and torch.allclose(null.norm(dim=1), torch.ones(3))
    assert torch.equal(model.null_condition(2, normalized=False)[0], model.null_cond.detach())
    assert float(model.null_cond.detach().std()) > 0.3  # random-normal init, not N(0, 0.02)


def test_bf16_autocast():
    torch.manual_seed(3)
    cfg = tiny("conv")
    model = Denoiser(cfg).eval()
    tokens = torch.randint(0, cfg.num_classes + 1, (2, cfg.seq_len))
    t, cond = torch.tensor([1, 10]), torch.randn(2, cfg.cond_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, t, cond)
    assert out.dtype == torch.float32
    assert torch.allclose(out.logsumexp(dim=1), torch.zeros(2, cfg.seq_len), atol=1e-4)
    assert torch.allclose(out, model(tokens, t, cond), atol=0.1)


def test_config_errors_and_independence_from_diffusion():
    with pytest.raises(UserError):
        tiny(mlp="mixer")
    with pytest.raises(UserError):
        tiny(dim=30, heads=4)
    imports = [line for line in inspect.getsource(transformer).splitlines() if line.startswith(("import", "from"))]
    assert imports and not any("diffusion" in line for line in imports)


@pytest.mark.parametrize("kind, radius", [("conv", 2), ("dwconv", 1)])
@pytest.mark.parametrize("r, c", [(0, 0), (2, 3), (4, 6), (1, 5)])
def test_grid_mlps_see_the_row_major_grid(kind, radius, r, c):
    """Sequence index i is grid cell (i // w, i % w), as the position embeddings and the VQ's
    flatten(1) have it: a change at (r, c) of a 5 x 7 grid reaches exactly the cells within
    ``radius`` rows and columns of it (read transposed, as (w, h), it would not): 2 through the
    conv MLP's two 3x3 convolutions, 1 through the dwconv MLP's one depthwise 3x3 filter."""
    torch.manual_seed(0)
    h, w, D = 5, 7, 8
    module = transformer.ConvMLP if kind == "conv" else transformer.DepthwiseConvMLP
    mlp = module(D, 2, h, w).double()
    x = torch.randn(1, h * w, D, dtype=torch.float64)
    bumped = x.clone()
    bumped[0, r * w + c] += 1.0
    changed = (mlp(bumped) - mlp(x)).abs().amax(dim=-1)[0] > 1e-12
    expected = torch.tensor([abs(i // w - r) <= radius and abs(i % w - c) <= radius for i in range(h * w)])
    assert torch.equal(changed, expected)


def test_dwconv_mlp_is_linear_depthwise_3x3_gelu_linear():
    """DepthwiseConvMLP equals fc1 -> a per-channel 3x3 correlation with zero padding -> quick GELU
    -> fc2, written out cell by cell in float64."""
    torch.manual_seed(0)
    h, w, D, ratio = 5, 7, 4, 2
    mlp = transformer.DepthwiseConvMLP(D, ratio, h, w).double()
    x = torch.randn(1, h * w, D, dtype=torch.float64)
    hidden = x[0] @ mlp.fc1.weight.T + mlp.fc1.bias  # (h*w, ratio*D)
    grid = hidden.reshape(h, w, ratio * D)
    filt = mlp.dw.weight[:, 0]  # (ratio*D, 3, 3)
    mixed = torch.zeros_like(grid)
    for i in range(h):
        for j in range(w):
            total = mlp.dw.bias.clone()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        total = total + filt[:, di + 1, dj + 1] * grid[i + di, j + dj]
            mixed[i, j] = total
    mixed = mixed * torch.sigmoid(1.702 * mixed)
    reference = mixed.reshape(h * w, -1) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert torch.allclose(mlp(x)[0], reference, atol=1e-12)


def test_modulate_is_layer_norm_times_one_plus_scale_plus_shift():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    scale, shift = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-5)
    expected = normed * (1 + scale[:, None]) + shift[:, None]
    got = transformer._modulate(x, torch.cat([scale, shift], dim=-1))
    assert torch.allclose(got, expected, atol=1e-10)
    zero = transformer._modulate(x, torch.zeros(2, 12, dtype=torch.float64))
    assert torch.allclose(zero, normed, atol=1e-10)  # zero modulation leaves the layer norm as it is


def test_linear_mlp_is_fc2_of_quick_gelu_of_fc1():
    """The folded form (silu with the 1.702 scalings on addmm's alpha and beta, in place without
    gradients) against the formula written out in float64, forward and gradients."""
    torch.manual_seed(0)
    mlp = transformer.LinearMLP(6, 3).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)

    def written_out(x):
        h = x @ mlp.fc1.weight.T + mlp.fc1.bias
        return (h * torch.sigmoid(1.702 * h)) @ mlp.fc2.weight.T + mlp.fc2.bias

    want = written_out(x)
    got = mlp(x)
    assert got.shape == (2, 5, 6) and torch.allclose(got, want, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(mlp(x), want, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), [x, mlp.fc1.weight, mlp.fc2.bias])
    grads_want = torch.autograd.grad(want.square().sum(), [x, mlp.fc1.weight, mlp.fc2.bias])
    for g, w in zip(grads, grads_want):
        assert torch.allclose(g, w, atol=1e-10)


def test_linear_mlp_inference_cast_cache_is_exact_and_follows_the_weights():
    """Under autocast without gradients the MLP keeps its bf16 weight casts between forwards:
    the output must equal, bit for bit, the forward that casts afresh (the same one with
    gradients on), and any change of the weights, of the autocast dtype or of the module's
    device/dtype must drop the kept casts."""
    torch.manual_seed(0)
    mlp = transformer.LinearMLP(8, 2)
    x = torch.randn(3, 4, 8)

    def fresh():  # with gradients on nothing is kept: autocast casts the weights in this call
        with torch.autocast("cpu", torch.bfloat16), torch.enable_grad():
            return mlp(x).detach()

    def kept():
        with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
            return mlp(x)

    first = kept()
    assert first.dtype == torch.bfloat16 and mlp._cast is not None
    cast_w1 = mlp._cast[2]
    assert cast_w1.dtype == torch.bfloat16 and torch.equal(cast_w1, mlp.fc1.weight.t().to(torch.bfloat16))
    assert torch.equal(kept(), first) and mlp._cast[2] is cast_w1  # reused, not cast again
    assert torch.equal(fresh(), first)
    assert mlp._cast is None  # a forward with gradients drops the kept casts

    kept()
    with torch.no_grad():
        mlp.fc2.weight.mul_(-2)  # an optimizer step or load_state_dict writes in place, like this
    after = kept()
    assert not torch.equal(after, first) and torch.equal(after, fresh())

    kept()
    new = torch.nn.Parameter(torch.randn(16, 8))
    with torch.no_grad():
        while new._version < mlp.fc1.weight._version:
            new.mul_(1.0)  # as many writes as the old weights had: only the data_ptr tells them apart
    assert new._version == mlp.fc1.weight._version
    mlp.fc1.weight = new
    assert torch.equal(kept(), fresh())

    kept()
    mlp.double()  # .to() and friends drop the entry
    assert mlp._cast is None
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert mlp(x.double()).dtype == torch.float64  # autocast leaves float64 alone, so nothing is cast
    assert mlp._cast is None
    mlp.float()
    with torch.autocast("cpu", torch.float16), torch.no_grad():
        half = mlp(x)
    assert half.dtype == torch.float16 and mlp._cast[2].dtype == torch.float16
    with torch.no_grad():
        plain = mlp(x)  # no autocast: float32, nothing kept
    assert plain.dtype == torch.float32 and mlp._cast is None
