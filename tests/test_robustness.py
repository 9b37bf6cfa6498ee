"""Reliability: an interrupted save never damages the previous file, a NaN
loss stops training before poisoned weights are written, and no file a user
hands us is ever unpickled.

The companion file test_bad_inputs.py holds the table of bad configs and
arguments; test_training_resume.py covers SIGKILL-and-rerun.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipvqd import checkpoint
from clipvqd.config import load_config
from clipvqd.errors import UserError
from clipvqd.models import vq_config
from clipvqd.project import Project
from clipvqd.vqgan import GumbelVQGAN
from clipvqd_cli.app import app
from tiny_project import write_fake_tokens, write_tiny_project

runner = CliRunner()
QUIET = ["--set", "train_vq.log_every=1000", "--set", "train_diffusion.log_every=1000"]  # no progress lines


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """The CLI attaches its log handler to the stderr of the first invocation;
    CliRunner closes that stream, so each test starts without the handler."""
    import logging

    logger = logging.getLogger("clipvqd")
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def _cli(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(result, *needles: str) -> str:
    """Exit 2, one non-empty line, no traceback, and every needle in it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    return lines[0]


# --------------------------------------------------------------------------- 1. atomic saves


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def _model_state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.arange(5)}


@pytest.mark.parametrize("where", ["save_file", "fsync", "os.replace"])
def test_failed_model_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    path = tmp_path / "vq" / "model.safetensors"
    checkpoint.save_model(path, _model_state(1.0), "vq", {"size": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "save_file":
        real = checkpoint.save_file

        def half_then_boom(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)  # the temporary file exists and is complete...
            with open(filename, "r+b") as fh:  # ...then gets cut in half, as a full disk would leave it
                fh.truncate(os.path.getsize(filename) // 2)
            boom()

        monkeypatch.setattr(checkpoint, "save_file", half_then_boom)
    elif where == "fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", boom)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", boom)

    with pytest.raises(OSError, match="No space"):
        checkpoint.save_model(path, _model_state(2.0), "vq", {"size": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    state, meta = checkpoint.load_model(path, "vq")
    assert torch.equal(state["w"], torch.full((4, 3), 1.0)) and meta["config"] == {"size": 1}
    assert _tmp_files(path.parent) == []


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    checkpoint.save_training_state(checkpoint.checkpoint_path(folder, 3), 3, {"model": model.state_dict()},
                                   {"opt": opt.state_dict()})
    good = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        model.weight.fill_(float("nan"))

    def boom(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        checkpoint.save_training_state(checkpoint.checkpoint_path(folder, 3), 3, {"model": model.state_dict()},
                                       {"opt": opt.state_dict()})
    monkeypatch.undo()
    assert _tmp_files(folder) == []
    step, modules, optimizers, _ = checkpoint.load_training_state(checkpoint.latest_checkpoint(folder))
    assert step == 3
    for k, v in good.items():
        assert torch.equal(modules["model"][k], v)
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(optimizers["opt"])  # the optimizer state round-trips too


def test_temporary_files_left_by_a_killed_save_are_ignored_and_pruned(tmp_path):
    """SIGKILL mid-save skips the cleanup: the half-written file must never be
    taken for a checkpoint, and the next save removes it."""
    folder = tmp_path / "checkpoints"
    state = {"model": {"w": torch.ones(2)}}
    checkpoint.save_training_state(checkpoint.checkpoint_path(folder, 3), 3, state, {})
    stale = folder / ".step-0000006.safetensors.tmp-4999999"  # above Linux's largest pid: that process is gone
    live = folder / f".step-0000009.safetensors.tmp-{os.getppid()}"  # a live process's save in progress: kept
    live.write_bytes(b"being written")
    stale.write_bytes(b"half a file")
    assert checkpoint.latest_checkpoint(folder) == checkpoint.checkpoint_path(folder, 3)
    checkpoint.save_training_state(checkpoint.checkpoint_path(folder, 6), 6, state, {})
    checkpoint.prune_checkpoints(folder, keep=2)
    assert not stale.exists() and live.exists()
    live.unlink()
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000003.safetensors", "step-0000006.safetensors"]


# --------------------------------------------------------------------------- 6. NaN / Inf guard


@pytest.fixture
def token_project(tmp_path):
    project = write_tiny_project(tmp_path / "proj")
    write_fake_tokens(project.parent)
    return project


def test_nan_loss_stops_train_diffusion_before_saving(token_project, monkeypatch):
    """The loss turns NaN at step 5 (save_every = 3): exit 2 naming step 5 and
    the step-3 checkpoint; no model file; the checkpoint holds finite weights."""
    import clipvqd.stages.train_diffusion as stage

    real = stage.vlb_loss
    calls = []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(stage, "vlb_loss", poisoned)
    result = _cli("train-diffusion", "--project", str(token_project), *QUIET)
    line = _one_line_error(result, "step 5", "step-0000003.safetensors", "loss")
    assert "NaN" in line
    root = token_project.parent / "diffusion"
    assert not (root / "model.safetensors").exists()
    last = checkpoint.latest_checkpoint(root / "checkpoints")
    assert last is not None and last.name == "step-0000003.safetensors"
    step, modules, _, _ = checkpoint.load_training_state(last)
    assert step == 3
    assert all(torch.isfinite(v).all() for v in modules["model"].values() if v.is_floating_point())
    assert len(calls) == 5  # stopped at once, no further step


def test_nan_at_the_first_step_says_no_checkpoint_was_saved(token_project, monkeypatch):
    import clipvqd.stages.train_diffusion as stage

    real = stage.vlb_loss
    monkeypatch.setattr(stage, "vlb_loss", lambda *a, **k: {**real(*a, **k), "vlb": torch.tensor(float("inf"))})
    result = _cli("train-diffusion", "--project", str(token_project), *QUIET)
    _one_line_error(result, "vlb", "step 1", "no checkpoint was saved yet")
    assert not (token_project.parent / "diffusion" / "model.safetensors").exists()


@pytest.mark.parametrize("stage, folder", [("train-vq", "vq"), ("train-diffusion", "diffusion")])
def test_huge_learning_rate_stops_training_with_a_clear_message(tmp_path, stage, folder):
    """No monkeypatching: a learning rate of 1e30 blows the model up for real."""
    project = write_tiny_project(tmp_path / "proj")
    write_fake_tokens(project.parent)
    section = stage.replace("-", "_")
    result = _cli(stage, "--project", str(project), "--set", f"{section}.lr=1e30", *QUIET)
    line = _one_line_error(result, "NaN/Inf at step", "learning rate")
    assert not (tmp_path / "proj" / folder / "model.safetensors").exists()
    last = checkpoint.latest_checkpoint(tmp_path / "proj" / folder / "checkpoints")
    if last is not None:  # any checkpoint kept is from before the blow-up
        step = checkpoint.load_training_state(last)[0]
        assert f"step-{step:07d}" in line
        failed_at = int(line.split("at step ")[1].split(";")[0])
        assert step < failed_at


# --------------------------------------------------------------------------- 5. untrusted files


class _Bomb:
    """Unpickling this runs os.system and leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_bombs(folder: Path, marker: Path) -> dict[str, Path]:
    """The same bomb as a torch.save zip, a raw pickle, and a pickle named .safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {"weight": _Bomb(marker)}}
    zip_pt = folder / "bomb.pt"
    torch.save(payload, zip_pt)
    raw = pickle.dumps(payload)
    (folder / "bomb.pth").write_bytes(raw)
    (folder / "bomb.safetensors").write_bytes(raw)
    return {"pt": zip_pt, "pth": folder / "bomb.pth", "safetensors": folder / "bomb.safetensors"}


def _pickle_calls(data: bytes) -> set[str]:
    """The callables a pickle would import and call (GLOBAL / STACK_GLOBAL followed
    later by REDUCE), read with pickletools: nothing is unpickled."""
    strings: list[str] = []
    imported: list[str] = []
    reduced = False
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            imported.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            imported.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
        reduced |= op.name == "REDUCE"
    return set(imported) if reduced else set()


def test_the_bombs_are_live(tmp_path):
    """Control, without unpickling anything: every bomb file holds a pickle that
    would import and call os.system, so the refusals below would notice an unpickle."""
    bombs = _write_bombs(tmp_path / "bombs", tmp_path / "control-marker")
    system = f"{os.system.__module__}.system"
    with zipfile.ZipFile(bombs["pt"]) as archive:
        (data_pkl,) = [name for name in archive.namelist() if name.endswith("data.pkl")]
        assert system in _pickle_calls(archive.read(data_pkl))
    for kind in ("pth", "safetensors"):
        assert system in _pickle_calls(bombs[kind].read_bytes())
    assert _pickle_calls(pickle.dumps({"weight": [1.0, 2.0]})) == set()  # a plain pickle calls nothing


@pytest.fixture
def bombs(tmp_path):
    marker = tmp_path / "EXECUTED"
    yield _write_bombs(tmp_path / "bombs", marker), marker
    assert not marker.exists(), "a pickle payload was executed"


@pytest.mark.parametrize("kind", ["pt", "pth", "safetensors"])
def test_pickle_as_vq_model_is_refused(tmp_path, bombs, kind):
    files, marker = bombs
    project = write_tiny_project(tmp_path / "proj")
    (tmp_path / "proj" / "vq").mkdir()
    (tmp_path / "proj" / "vq" / "model.safetensors").write_bytes(files[kind].read_bytes())
    result = _cli("tokenize", "--project", str(project))
    _one_line_error(result, "model.safetensors", "never loads pickled files")
    assert not marker.exists()


def test_pickle_as_diffusion_model_is_refused(tmp_path, bombs):
    files, marker = bombs
    project = write_tiny_project(tmp_path / "proj")
    write_fake_tokens(project.parent)
    (tmp_path / "proj" / "diffusion").mkdir()
    (tmp_path / "proj" / "diffusion" / "model.safetensors").write_bytes(files["pt"].read_bytes())
    _one_line_error(_cli("finetune-cfg", "--project", str(project)), "model.safetensors", "never loads pickled")
    _one_line_error(_cli("sample", "a red circle", "--project", str(project)), "model.safetensors")
    assert not marker.exists()


def test_pickle_as_training_checkpoint_is_refused(tmp_path, bombs):
    files, marker = bombs
    project = write_tiny_project(tmp_path / "proj")
    write_fake_tokens(project.parent)
    folder = tmp_path / "proj" / "diffusion" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-0000003.safetensors").write_bytes(files["pt"].read_bytes())
    _one_line_error(_cli("train-diffusion", "--project", str(project)), "step-0000003.safetensors")
    assert not marker.exists()


def _write_vq(project_file: Path) -> None:
    """An untrained but valid vq/model.safetensors for the tiny project."""
    config = load_config(project_file)
    model = GumbelVQGAN(vq_config(config))
    checkpoint.save_model(Project.from_file(project_file).vq.model, model.state_dict(), "vq", model.cfg.to_dict())


@pytest.mark.parametrize("clip_model, kind", [("shapes", "pt"), ("shapes", "safetensors"), ("RN50", "pt"),
                                              ("RN50", "pth"), ("RN50", "safetensors")])
def test_pickle_as_clip_weights_is_refused(tmp_path, bombs, clip_model, kind):
    files, marker = bombs
    project = write_tiny_project(tmp_path / "proj")
    _write_vq(project)
    result = _cli("tokenize", "--project", str(project), "--set", f"clip.model={clip_model}",
                  "--set", f"clip.pretrained={files[kind]}")
    _one_line_error(result, files[kind].name)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pt", "pth", "safetensors"])
def test_pickle_as_perceptual_weights_is_refused(tmp_path, bombs, kind):
    files, marker = bombs
    project = write_tiny_project(tmp_path / "proj")
    result = _cli("train-vq", "--project", str(project), "--set", "train_vq.perceptual_weight=1",
                  "--set", f"train_vq.perceptual_weights={files[kind]}")
    _one_line_error(result, files[kind].name)
    assert not marker.exists()
    assert not (tmp_path / "proj" / "vq" / "model.safetensors").exists()


def test_every_torch_load_in_the_library_is_weights_only():
    """A source-level guard: no torch.load without weights_only=True, no pickle
    module, no numpy allow_pickle=True anywhere in clipvqd/."""
    root = Path(__file__).resolve().parent.parent / "clipvqd"
    offenders = []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}")
            if "allow_pickle=True" in code or "import pickle" in code or "pickle.load" in code:
                offenders.append(f"{path.name}:{n}")
    assert offenders == []


def test_read_metadata_refuses_a_pickle_directly(tmp_path, bombs):
    files, marker = bombs
    for path in files.values():
        with pytest.raises(UserError, match="never loads pickled"):
            checkpoint.read_metadata(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pt", "pth", "safetensors"])
def test_pickle_as_inception_file_is_refused(bombs, kind):
    """eval.inception_weights is TorchScript (clean-fid's format): torch.jit.load's
    unpickler resolves no Python globals, so a bomb is an error, not a run."""
    from clipvqd.fid import InceptionExtractor

    files, marker = bombs
    with pytest.raises(UserError, match="not clean-fid's Inception"):
        InceptionExtractor(files[kind])
    assert not marker.exists()


@pytest.mark.parametrize("name", ["codes.npy", "clip.npy"])
def test_pickle_in_tokens_is_refused(tmp_path, bombs, name):
    """tokens/ arrays are read with allow_pickle=False: a pickle (raw, or an
    object array inside a real .npy) is an error naming tokens/, never run."""
    import numpy as np

    files, marker = bombs
    project = write_tiny_project(tmp_path / "proj")
    write_fake_tokens(project.parent)
    target = project.parent / "tokens" / name
    target.write_bytes(files["pth"].read_bytes())
    _one_line_error(_cli("train-diffusion", "--project", str(project)), "tokens/", "clipvqd tokenize")
    with open(target, "wb") as fh:
        np.save(fh, np.array([_Bomb(marker)], dtype=object), allow_pickle=True)
    _one_line_error(_cli("train-diffusion", "--project", str(project)), "tokens/", "clipvqd tokenize")
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_says_how_to_go_on(token_project):
    """A checkpoint damaged outside clipvqd (a partial copy): one line naming it and
    the way out; deleting it resumes from the one before, and training finishes."""
    quiet = [*QUIET, "--set", "train_diffusion.steps=6"]
    assert _cli("train-diffusion", "--project", str(token_project), *quiet).exit_code == 0
    folder = token_project.parent / "diffusion" / "checkpoints"
    (token_project.parent / "diffusion" / "model.safetensors").unlink()
    newest = checkpoint.latest_checkpoint(folder)
    assert newest.name == "step-0000006.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = _cli("train-diffusion", "--project", str(token_project), *quiet)
    _one_line_error(result, "step-0000006.safetensors", "delete it to resume from the checkpoint before it")
    newest.unlink()
    again = _cli("train-diffusion", "--project", str(token_project), *quiet)
    assert again.exit_code == 0, again.output
    assert "resumed from step 3" in again.output
    assert (token_project.parent / "diffusion" / "model.safetensors").is_file()


def test_lowering_steps_below_the_checkpoint_is_an_error_not_a_relabelled_model(token_project):
    """Resuming a 12-step run with steps = 6 used to rewrite model.safetensors as a
    "6-step" model holding the step-12 weights ('-6 steps this run')."""
    assert _cli("train-diffusion", "--project", str(token_project), *QUIET).exit_code == 0
    model = token_project.parent / "diffusion" / "model.safetensors"
    before = model.read_bytes()
    result = _cli("train-diffusion", "--project", str(token_project), *QUIET, "--set", "train_diffusion.steps=6")
    _one_line_error(result, "step-0000012.safetensors", "step 12", "train_diffusion.steps = 6", "delete")
    assert model.read_bytes() == before
