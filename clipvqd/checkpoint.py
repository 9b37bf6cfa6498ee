"""Model files and resumable training state, as safetensors only, written atomically.

Why not ``accelerate.save_state``: its loader unpickles (custom objects and RNG
states with ``weights_only=False``), and nothing a user hands us may be
unpickled. Our training state needs no RNG state anyway: every step draws from
generators seeded by (seed, step, rank), so a resumed run repeats exactly.

A model file holds the weights plus JSON metadata: ``kind`` (vq, diffusion,
...) and the ``config`` needed to rebuild the model from the file alone.
A training checkpoint (``checkpoints/step-NNNNNNN.safetensors``) holds
``model.*``, ``ema.*``, ``optim.*`` and ``state.*`` tensors, plus JSON for the
non-tensor parts (step, optimizer param groups).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from clipvqd.errors import UserError

FORMAT = "clipvqd-1"


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file so that a crash at any point leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (JSON, JSONL index) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; a UserError for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc}); clipvqd never loads pickled files") from None


def save_model(path: Path, state: dict[str, torch.Tensor], kind: str, config: dict, extra: dict | None = None) -> None:
    """A self-describing model file: weights + kind + the config that rebuilds it."""
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(config, sort_keys=True)}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    atomic_save_tensors(path, state, meta)


def load_model(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and metadata (config and extras parsed from JSON) of a model file of ``kind``."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        found = meta.get("kind", "no clipvqd metadata")
        raise UserError(f"{path}: expected a clipvqd {kind} model file, found {found}")
    parsed = {}
    for k, v in meta.items():
        try:
            parsed[k] = json.loads(v)
        except json.JSONDecodeError:
            parsed[k] = v
    return load_file(str(path)), parsed


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- training state


def _flatten_optimizer(opt_state: dict, prefix: str, tensors: dict, info: dict) -> None:
    info[prefix] = {"param_groups": opt_state["param_groups"], "scalars": {}}
    for pid, slots in opt_state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{name}"] = value
            else:
                info[prefix]["scalars"][f"{pid}.{name}"] = value


def _unflatten_optimizer(prefix: str, tensors: dict, info: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info[prefix]["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info[prefix]["param_groups"]}


def save_training_state(
    path: Path,
    step: int,
    modules: dict[str, dict[str, torch.Tensor]],
    optimizers: dict[str, dict],
    info: dict | None = None,
) -> None:
    """One file with every tensor needed to resume: ``modules`` are state dicts
    (model, ema, sampler history ...), ``optimizers`` are optimizer state dicts."""
    tensors: dict[str, torch.Tensor] = {}
    meta_info: dict = {"step": step, "modules": sorted(modules), "optimizers": sorted(optimizers), "info": info or {}}
    for name, sd in modules.items():
        for k, v in sd.items():
            tensors[f"{name}.{k}"] = v
    for name, opt_state in optimizers.items():
        _flatten_optimizer(opt_state, f"optim-{name}", tensors, meta_info)
    atomic_save_tensors(path, tensors, {"format": FORMAT, "kind": "train-state", "state": json.dumps(meta_info)})


def load_training_state(path: Path) -> tuple[int, dict[str, dict], dict[str, dict], dict]:
    """Inverse of :func:`save_training_state`: (step, modules, optimizers, info)."""
    meta = read_metadata(path)
    if meta.get("kind") != "train-state":
        raise UserError(f"{path}: not a clipvqd training checkpoint")
    state = json.loads(meta["state"])
    tensors = load_file(str(path))
    modules = {name: {} for name in state["modules"]}
    for key, value in tensors.items():
        head, rest = key.split(".", 1)
        if head in modules:
            modules[head][rest] = value
    optimizers = {name: _unflatten_optimizer(f"optim-{name}", tensors, state) for name in state["optimizers"]}
    return state["step"], modules, optimizers, state["info"]


_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")
_TMP_FILE = re.compile(r"^\.step-\d+\.safetensors\.tmp-(\d+)$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:07d}.safetensors"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: Path, keep: int = 2) -> None:
    """Delete all but the ``keep`` newest checkpoints, and stale temporary files."""
    folder = Path(folder)
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)
    for p in folder.iterdir():  # left by a process killed mid-save (its cleanup never ran)
        m = _TMP_FILE.match(p.name)
        if m and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:  # exists, but belongs to another user
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def load_foreign_weights(path: Path, what: str) -> dict:
    """A third-party weights file as a dict of tensors: safetensors, or a torch
    file read with ``weights_only=True`` (never unpickling code). Anything
    else is a UserError that says the file was refused, not run."""
    import warnings

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # weights_only refusals, truncated or foreign files: all the user's to fix
        raise UserError(
            f"{what} {path} was refused: it is not a file of plain tensors, and clipvqd never unpickles code; "
            "convert weights you trust to .safetensors"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} does not hold a state dict")
    return state
