"""Training survives SIGKILL: rerunning resumes from the newest checkpoint and
ends with exactly the weights of an uninterrupted run of the same seed."""

from __future__ import annotations

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


def _cmd(project: Path, stage: str) -> list[str]:
    return [sys.executable, "-m", "clipvqd_cli.app", stage, "--project", str(project)]


def _run(project: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(project, stage), capture_output=True, text=True, timeout=300)


def _run_with_kills(project: Path, stage: str, stage_dir: Path, kills: int, rng: random.Random) -> int:
    """Start the stage, SIGKILL it once it has saved at least one new checkpoint
    (after a random extra delay), ``kills`` times; then let it finish."""
    done_kills = 0
    while done_kills < kills:
        before = latest_checkpoint(stage_dir / "checkpoints")
        proc = subprocess.Popen(_cmd(project, stage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    final = _run(project, stage)
    assert final.returncode == 0, final.stderr
    return done_kills


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


STAGE_DIRS = {"train-vq": "vq", "train-diffusion": "diffusion", "finetune-cfg": "diffusion-cfg"}


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
    sub = STAGE_DIRS[stage]
    assert _run(straight, stage).returncode == 0
    kills = _run_with_kills(killed, stage, killed.parent / sub, kills=2, rng=rng)
    assert kills >= 1
    _assert_same_weights(straight.parent / sub / "model.safetensors", killed.parent / sub / "model.safetensors")
    log = (killed.parent / sub / "log.jsonl").read_text()
    assert "resumed at step" in log
    # every checkpoint left behind loads
    for ckpt in (killed.parent / sub / "checkpoints").glob("step-*.safetensors"):
        load_file(str(ckpt))
