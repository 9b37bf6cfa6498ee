"""Pieces of the training loops: the weight EMA."""

from __future__ import annotations

import torch

from clipvqd.training import EMA


def test_ema_matches_the_recurrence_in_float64():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    expected = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v.double()
    for k in expected:
        assert torch.allclose(ema.shadow[k].double(), expected[k], atol=1e-6)
    half = model.to(torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in ema.weights_for(half).values())


def test_ema_follows_the_model_to_its_device():
    """The loops make the EMA before accelerate moves the model to the GPU; an average left on
    the CPU would fail at the first update (here the meta device stands in for a GPU)."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    model.to("meta")
    ema.update(model)
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}
