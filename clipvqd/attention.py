"""Scaled dot-product attention, with one CPU-specific choice.

Under CPU bf16 autocast with gradients on, torch's bf16 attention backward
runs 1.7-5x slower than its fp32 one (at the shapes and the paper denoiser's
shapes: examples/benchmarks/precision.py, RESULTS.md "bf16 on a CPU"), which
made bf16 training no faster than fp32 here. There the attention alone runs in fp32;
everywhere else (GPUs, inference, fp32) it is ``F.scaled_dot_product_attention``
unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v over (..., L, d) tensors, in q's dtype."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)
