"""`clipvqd demo`: its budget loads, and its choice of precision per stage."""

import dataclasses

import pytest

from clipvqd.config import load_config
from clipvqd.stages import demo
from clipvqd.templates import write_project_file


@pytest.fixture
def demo_config(tmp_path):
    return load_config(write_project_file(tmp_path / "p", "shapes"), demo.DEMO_OVERRIDES)


def _with(config, **project):
    return dataclasses.replace(config, project=dataclasses.replace(config.project, **project))


def test_the_demo_budget_is_a_valid_shapes_config(demo_config, tmp_path):
    assert demo_config.eval.protocol == "shapes"
    defaults = load_config(write_project_file(tmp_path / "d", "shapes"))
    for section in ("train_vq", "train_diffusion", "finetune_cfg", "sample"):  # a cut-down shapes run
        assert 0 < getattr(demo_config, section).steps < getattr(defaults, section).steps, section


@pytest.mark.parametrize("native, file_choice, device, expected", [
    (True, "no", "cpu", "bf16"),   # native bf16 CPU: the denoiser's stages in bf16
    (False, "no", "cpu", "no"),    # emulated bf16 is slower than fp32: keep fp32
    (True, "fp16", "cpu", "fp16"),  # the project file's explicit choice wins
    (False, "bf16", "cpu", "bf16"),
])
def test_denoiser_precision(demo_config, monkeypatch, native, file_choice, device, expected):
    monkeypatch.setattr(demo, "native_cpu_bf16", lambda: native)
    assert demo.denoiser_precision(_with(demo_config, mixed_precision=file_choice, device=device)) == expected


@pytest.mark.parametrize("native, expected", [(True, "bf16 autocast"), (False, "no native bf16")])
def test_the_demo_says_which_precision_and_warns_of_a_longer_fp32_run(demo_config, monkeypatch, native, expected):
    monkeypatch.setattr(demo, "native_cpu_bf16", lambda: native)
    config = _with(demo_config, mixed_precision="no", device="cpu")
    assert expected in demo.precision_note(config, demo.denoiser_precision(config))
    assert demo.precision_note(_with(demo_config, mixed_precision="bf16", device="cpu"), "bf16") is None  # the file's choice


def test_a_finished_stage_shows_no_stale_numbers():
    finished = {"steps": "1000 (already finished)"}  # the stage reports no losses then
    assert demo._trained(finished, lambda: f"loss {finished['loss']}") == "1000 (already finished) steps"
    assert demo._trained({"steps": "1000 (1000 this run)"}, lambda: "loss 0.500") == "1000 (1000 this run) steps, loss 0.500"


def test_one_process_runs_stages_of_different_precisions(demo_config):
    """The demo trains the tokenizer in fp32 and the denoiser in bf16 in one process;
    accelerate alone would refuse the second precision."""
    import torch

    from clipvqd.training import make_accelerator

    for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16), ("no", torch.float32)):
        acc = make_accelerator(_with(demo_config, mixed_precision=precision, device="cpu").project)
        with acc.autocast():
            out = torch.nn.Linear(3, 3)(torch.ones(2, 3))
        assert acc.mixed_precision == precision and out.dtype == dtype


def test_a_status_line_prints_as_written_on_one_line():
    """A log file is 80 columns wide: the demo's lines must not wrap there, nor lose a path's brackets."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=40, color_system=None)
    line = "contact sheet: /tmp/runs [seed 1]/clipvqd-demo/demo-contact-sheet.png (a long path) [bold]x[/]"
    demo.say(console, line)
    assert buffer.getvalue() == line + "\n"


@pytest.mark.parametrize("native, precision, device, warned", [
    (False, "bf16", "cpu", True),   # emulated: a bf16 matmul ran 25-50x slower than fp32 (SPEED.md)
    (True, "bf16", "cpu", False),
    (False, "no", "cpu", False),
    (False, "bf16", "meta", False),  # not a CPU: nothing to say
])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_of_once(monkeypatch, caplog, native, precision, device, warned):
    import torch

    from clipvqd.stages import common

    monkeypatch.setattr(common, "native_cpu_bf16", lambda: native)
    monkeypatch.setattr(common, "_warned_emulated_bf16", False)
    with caplog.at_level("WARNING", logger="clipvqd"):
        for _ in range(3):
            common.warn_if_bf16_is_emulated(precision, torch.device(device))
    lines = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
