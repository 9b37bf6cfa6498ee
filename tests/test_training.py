"""Pieces of the training loops: the weight EMA, the NaN check under gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from clipvqd.errors import UserError
from clipvqd.training import EMA
from tiny_project import write_fake_tokens, write_tiny_project


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


@pytest.mark.parametrize("stage_name", ["train_diffusion", "train_vq"])
def test_a_nan_in_an_early_micro_batch_stops_before_any_step_is_saved(tmp_path, monkeypatch, stage_name):
    """grad_accum = 2: a NaN loss in micro-batch 0 of step 3 used to pass the check (only the last
    micro-batch's loss was checked, computed before the poisoned update) and step 3's checkpoint
    was saved with NaN weights, then named "the last good checkpoint"."""
    from clipvqd.config import load_config
    from clipvqd.project import Project
    from clipvqd.stages import train_diffusion, train_vq

    stage = {"train_diffusion": train_diffusion, "train_vq": train_vq}[stage_name]
    calls = {"n": 0}
    if stage_name == "train_diffusion":
        real = train_diffusion.vlb_loss

        def poisoned(*args, **kwargs):
            out = real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 5:  # step 3 (index 2), micro-batch 0 of 2
                out["loss"] = out["loss"] * float("nan")
            return out

        monkeypatch.setattr(train_diffusion, "vlb_loss", poisoned)
    else:
        real = train_vq.VQLoss.generator_step

        def poisoned(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 5:
                out["total"] = out["total"] * float("nan")
            return out

        monkeypatch.setattr(train_vq.VQLoss, "generator_step", poisoned)
    path = write_tiny_project(tmp_path / "proj")
    if stage_name == "train_diffusion":
        write_fake_tokens(path.parent)
    section = stage_name
    config = load_config(path, ["project.grad_accum=2", f"{section}.steps=6", f"{section}.save_every=3"])
    project = Project.from_file(path)
    with pytest.raises(UserError, match="at step 3"):
        stage.run(config, project)
    root = tmp_path / "proj" / ("diffusion" if stage_name == "train_diffusion" else "vq")
    saved = list((root / "checkpoints").glob("*.safetensors")) if (root / "checkpoints").exists() else []
    for file in saved:
        assert all(torch.isfinite(v).all() for v in load_file(str(file)).values() if v.is_floating_point()), file
    assert not (root / "model.safetensors").exists()


def test_train_vq_hands_the_lpips_file_to_the_perceptual_loss(tmp_path, monkeypatch):
    """train_vq.lpips_weights (relative to the project) reaches VQLoss; before, it had no way in."""
    from clipvqd.config import load_config
    from clipvqd.project import Project
    from clipvqd.stages import train_vq

    seen = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(train_vq, "VQLoss", capture)
    path = write_tiny_project(tmp_path / "proj")
    config = load_config(path, ["train_vq.perceptual_weight=1", "train_vq.perceptual_weights=vgg.safetensors",
                                "train_vq.lpips_weights=lin.pth"])
    with pytest.raises(Stop):
        train_vq.run(config, Project.from_file(path))
    assert seen["lpips_lin_weights"] == str(tmp_path / "proj" / "lin.pth")
    assert seen["perceptual_weights"] == str(tmp_path / "proj" / "vgg.safetensors")


def test_codes_outside_the_codebook_are_refused_in_one_line(tmp_path):
    """A hand-made codes.npy with a code >= K (or floats) crashed train-diffusion in an embedding lookup."""
    import numpy as np

    from clipvqd.config import load_config
    from clipvqd.project import Project
    from clipvqd.stages.train_diffusion import load_tokens

    path = write_tiny_project(tmp_path / "proj")
    write_fake_tokens(path.parent)
    config, project = load_config(path), Project.from_file(path)
    codes_file = project.tokens / "codes.npy"
    codes = np.load(codes_file)
    for bad in (codes.astype(np.int64) + 5000, codes.astype(np.float32)):
        np.save(codes_file, bad)
        with pytest.raises(UserError, match="codes outside"):
            load_tokens(config, project)


def test_a_nan_on_one_process_stops_every_process():
    """With several processes each one asks the others (an all-reduce): a process whose own loss is
    finite stops too when another saw a NaN; none stops when all are finite."""
    from clipvqd.training import check_finite

    class TwoProcesses:  # this process, plus one other whose flag is ``other``
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, other: float):
            self.other = other

        def reduce(self, tensor, reduction="sum"):
            return tensor + self.other

    check_finite({"loss": 1.0}, 5, "/nowhere", TwoProcesses(0.0))
    with pytest.raises(UserError, match="on another process.*step 5"):
        check_finite({"loss": 1.0}, 5, "/nowhere", TwoProcesses(1.0))
    with pytest.raises(UserError, match="loss"):
        check_finite({"loss": float("nan")}, 5, "/nowhere", TwoProcesses(0.0))
