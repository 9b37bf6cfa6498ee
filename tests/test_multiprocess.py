"""Scale-out is real: `train-diffusion` under torchrun with 2 CPU processes
(gloo) reads a distinct shard per process, keeps the replicas in sync through
averaged gradients, and writes one model file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tiny_project import write_fake_tokens, write_tiny_project

pytestmark = pytest.mark.slow


def _torchrun(project, stage: str, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "clipvqd_cli.app", stage, "--project", str(project)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _events(log) -> list[str]:
    return [json.loads(line)["event"] for line in log.read_text().splitlines() if "event" in json.loads(line)]


def test_train_diffusion_and_finetune_on_two_processes(tmp_path):
    project = write_tiny_project(tmp_path / "proj")
    write_fake_tokens(project.parent)
    _torchrun(project, "train-diffusion", 29517)
    events = _events(project.parent / "diffusion/log.jsonl")
    shards = next(e for e in events if e.startswith("2 processes"))
    assert "first items [0, 1]" in shards and "24 each" in shards  # 48 items split 0,2,4.. and 1,3,5..
    assert any(e.endswith(": in sync") for e in events), events
    weights = load_file(str(project.parent / "diffusion/model.safetensors"))
    assert weights and len(list((project.parent / "diffusion/checkpoints").glob("step-*.safetensors"))) >= 1
    # the guidance fine-tune trains the null condition outside the module call: DDP must still sync it
    _torchrun(project, "finetune-cfg", 29518)
    assert any(e.endswith(": in sync") for e in _events(project.parent / "diffusion-cfg/log.jsonl"))
    assert (project.parent / "diffusion-cfg/model.safetensors").is_file()
