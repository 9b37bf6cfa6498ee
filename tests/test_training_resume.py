"""Training survives SIGKILL: rerunning resumes from the newest checkpoint and
ends with exactly the weights of an uninterrupted run of the same seed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipvqd.checkpoint import latest_checkpoint
from tiny_project import write_fake_tokens, write_tiny_project

pytestmark = pytest.mark.slow


def _cmd(project: Path, stage: str, *sets: str) -> list[str]:
    return [sys.executable, "-m", "clipvqd_cli.app", stage, "--project", str(project), *(a for v in sets for a in ("-s", v))]


def _run(project: Path, stage: str, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(project, stage, *sets), capture_output=True, text=True, timeout=300)


def _run_with_kills(project: Path, stage: str, stage_dir: Path, kills: int, rng: random.Random, *sets: str) -> int:
    """Start the stage, SIGKILL it once it has saved at least one new checkpoint
    (after a random extra delay), ``kills`` times; then let it finish."""
    done_kills = 0
    while done_kills < kills:
        before = latest_checkpoint(stage_dir / "checkpoints")
        proc = subprocess.Popen(_cmd(project, stage, *sets), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            now = latest_checkpoint(stage_dir / "checkpoints")
            if now is not None and now != before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:  # finished before we could kill it
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_kills += 1
    final = _run(project, stage, *sets)
    assert final.returncode == 0, final.stderr
    return done_kills


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


STAGE_DIRS = {"train-vq": "vq", "train-diffusion": "diffusion", "finetune-cfg": "diffusion-cfg"}
# long enough (about 3 s of steps here) that a kill lands mid-run, not after the last step
LONG_RUNS = {"train-vq": "train_vq.steps=48", "train-diffusion": "train_diffusion.steps=120",
             "finetune-cfg": "finetune_cfg.steps=120"}


@pytest.mark.parametrize("stage", ["train-diffusion", "finetune-cfg", "train-vq"])
def test_sigkill_and_rerun_matches_uninterrupted(tmp_path, stage):
    rng = random.Random(stage)
    straight = write_tiny_project(tmp_path / "straight")
    killed = write_tiny_project(tmp_path / "killed")
    if stage != "train-vq":
        for p in (straight, killed):
            write_fake_tokens(p.parent)
    if stage == "finetune-cfg":  # both start from the same base model
        assert _run(straight, "train-diffusion").returncode == 0
        shutil.copytree(straight.parent / "diffusion", killed.parent / "diffusion")
    sub, steps = STAGE_DIRS[stage], LONG_RUNS[stage]
    assert _run(straight, stage, steps).returncode == 0
    kills = _run_with_kills(killed, stage, killed.parent / sub, 2, rng, steps)
    assert kills >= 1
    events = [json.loads(line).get("event", "") for line in (killed.parent / sub / "log.jsonl").read_text().splitlines()]
    resumed = [int(e.rsplit(" ", 1)[1]) for e in events if e.startswith("resumed at step")]
    assert resumed and min(resumed) < int(steps.split("=")[1]), events  # resumed mid-run at least once
    _assert_same_weights(straight.parent / sub / "model.safetensors", killed.parent / sub / "model.safetensors")
    # the whole final training state too: optimizer, EMA, and the timestep sampler's history (whose
    # distribution stays uniform at this size, so the weights alone would not show it lost)
    last_straight = latest_checkpoint(straight.parent / sub / "checkpoints")
    last_killed = latest_checkpoint(killed.parent / sub / "checkpoints")
    assert last_straight.name == last_killed.name
    _assert_same_weights(last_straight, last_killed)
    log = (killed.parent / sub / "log.jsonl").read_text()
    assert "resumed at step" in log
    # every checkpoint left behind loads
    for ckpt in (killed.parent / sub / "checkpoints").glob("step-*.safetensors"):
        load_file(str(ckpt))


@pytest.mark.parametrize("stage", ["train-vq", "train-diffusion"])
def test_rerunning_a_finished_stage_leaves_its_model_file_alone(tmp_path, stage):
    """A rewrite would change the file's bytes (safetensors orders metadata as it likes), so its
    sha256, and the tokens and denoiser recorded against it would look stale or be re-stamped."""
    project = write_tiny_project(tmp_path / "p")
    if stage != "train-vq":
        write_fake_tokens(project.parent)
    assert _run(project, stage).returncode == 0
    model = project.parent / STAGE_DIRS[stage] / "model.safetensors"
    before = model.stat()
    rerun = _run(project, stage)
    assert rerun.returncode == 0, rerun.stderr
    assert "already finished" in rerun.stdout and "nan" not in rerun.stdout  # no stale losses either
    after = model.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_finished_denoiser_of_other_tokens_is_refused(tmp_path):
    """tokenize ran again after train-diffusion finished: 'already finished' would keep a model of the
    old tokens (and before, re-stamp it with the new ones); the rerun must say so instead."""
    project = write_tiny_project(tmp_path / "p")
    write_fake_tokens(project.parent)
    assert _run(project, "train-diffusion").returncode == 0
    meta_path = project.parent / "tokens" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["clip"] = "another CLIP"
    meta_path.write_text(json.dumps(meta))
    rerun = _run(project, "train-diffusion")
    assert rerun.returncode == 2
    assert "trained on other tokens" in rerun.stderr and "delete" in rerun.stderr


def test_a_finished_model_with_unreadable_provenance_is_refused_in_one_line(tmp_path):
    from clipvqd import checkpoint
    from clipvqd.errors import UserError
    from clipvqd.stages.train_diffusion import _check_same_tokens

    path = tmp_path / "diffusion" / "model.safetensors"
    checkpoint.save_model(path, {"w": torch.zeros(1)}, "diffusion", {}, {"tokens": "{not json"})
    with pytest.raises(UserError, match="trained on other tokens"):
        _check_same_tokens(path, {"vq_sha256": "a" * 64, "clip": "shapes"})


def test_a_finished_fine_tune_of_an_older_base_model_is_refused(tmp_path):
    """train-diffusion ran again (here: more steps) after finetune-cfg finished: 'already finished'
    would keep guiding the old base model without a word; the rerun must say so, and sample notes it."""
    from clipvqd.project import Project
    from clipvqd.stages.finetune_cfg import stale_base

    project = write_tiny_project(tmp_path / "p")
    write_fake_tokens(project.parent)
    assert _run(project, "train-diffusion").returncode == 0
    assert _run(project, "finetune-cfg").returncode == 0
    assert not stale_base(Project.from_file(project))
    assert _run(project, "train-diffusion", "train_diffusion.steps=15").returncode == 0  # resumes to 15 steps
    rerun = _run(project, "finetune-cfg")
    assert rerun.returncode == 2, rerun.stdout
    assert "fine-tuned from another diffusion/model.safetensors" in rerun.stderr
    assert "train-diffusion ran since" in rerun.stderr and "delete" in rerun.stderr
    assert stale_base(Project.from_file(project))


def test_going_on_after_tokenize_ran_again_is_refused_and_a_finished_rerun_keeps_its_config(tmp_path):
    """More steps after `tokenize` made new tokens (here: of more images) resumed the old run on the
    new tokens and stamped the model as theirs; and a rerun that trains nothing rewrote config.json."""
    project = write_tiny_project(tmp_path / "p")
    write_fake_tokens(project.parent)
    assert _run(project, "train-diffusion").returncode == 0
    config_file = project.parent / "diffusion" / "config.json"
    before = config_file.read_text()
    again = _run(project, "train-diffusion", "train_diffusion.lr=0.5")
    assert again.returncode == 0 and "already finished" in again.stdout
    assert config_file.read_text() == before  # the finished run's own config, not the rerun's
    write_fake_tokens(project.parent, count=60)  # tokens/ made again (another data.count)
    meta_path = project.parent / "tokens" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data"] = {**meta.get("data", {}), "count": 60}
    meta_path.write_text(json.dumps(meta))
    for steps in ("12", "15"):  # finished as it was, or going on
        rerun = _run(project, "train-diffusion", f"train_diffusion.steps={steps}")
        assert rerun.returncode == 2, rerun.stdout
        assert "trained on other tokens" in rerun.stderr and "delete" in rerun.stderr


def test_train_vq_of_a_new_folder_on_a_finished_tokenizer_is_refused_and_not_recorded(tmp_path):
    from PIL import Image

    project = write_tiny_project(tmp_path / "p")  # data.source = "shapes"
    assert _run(project, "train-vq").returncode == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(photos / f"{i}.png")
    text = project.read_text()
    rerun = subprocess.run(_cmd(project, "train-vq") + [str(photos)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 2, rerun.stdout
    assert "trained on other images" in rerun.stderr and "delete" in rerun.stderr
    assert project.read_text() == text  # the folder is not recorded for tokenize
