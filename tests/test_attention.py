"""clipvqd.attention: plain scaled-dot-product attention, in fp32 for CPU bf16 training."""

import math

import torch
import torch.nn.functional as F

from clipvqd.attention import attention


def _qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 5, 4, generator=g, dtype=dtype) for _ in range(3)]


def test_matches_the_textbook_formula_in_float64():
    q, k, v = _qkv()
    reference = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v), reference, rtol=1e-12, atol=1e-12)


def test_cpu_bf16_training_attends_in_fp32_and_returns_bf16():
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in _qkv(torch.float32))
    with torch.autocast("cpu", torch.bfloat16):
        out = attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)  # exactly the fp32 result, rounded once
    out.float().sum().backward()  # and gradients flow back to the bf16 inputs
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_inference_keeps_torch_attention_unchanged():
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(torch.float32))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
