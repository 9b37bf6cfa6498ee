"""Every path inside a project directory, and nothing else.

A project directory holds ``clipvqd.toml`` and the artefacts of each stage:

    vq/            model.safetensors, config.json, log.jsonl, previews/, checkpoints/
    tokens/        codes.npy (uint16, N x h*w), clip.npy (float16, N x d), meta.json
    diffusion/     same inner layout as vq/
    diffusion-cfg/ same
    samples/<name>/  images/*.png, index.jsonl, contact sheets
    reranked/<name>/ the best samples per prompt, scores.jsonl
    eval/<name>.json and <name>.md
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from clipvqd.errors import UserError


@dataclass(frozen=True)
class StageDir:
    """The inner layout shared by the training stages (vq, diffusion, diffusion-cfg)."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


# The command that produces each artefact, for "run X first" messages.
PRODUCER = {
    "vq": "clipvqd train-vq",
    "tokens": "clipvqd tokenize",
    "diffusion": "clipvqd train-diffusion",
    "diffusion-cfg": "clipvqd finetune-cfg",
    "samples": "clipvqd sample",
}


@dataclass(frozen=True)
class Project:
    """Paths of one project; ``root`` is the folder that holds the project file."""

    root: Path

    @classmethod
    def from_file(cls, project_file: str | Path) -> "Project":
        return cls(Path(project_file).resolve().parent)

    def resolve(self, path: str) -> Path:
        """A user path from the project file: relative paths are relative to the project."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def vq(self) -> StageDir:
        return StageDir(self.root / "vq")

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def diffusion(self) -> StageDir:
        return StageDir(self.root / "diffusion")

    @property
    def diffusion_cfg(self) -> StageDir:
        return StageDir(self.root / "diffusion-cfg")

    @property
    def samples_root(self) -> Path:
        return self.root / "samples"

    def samples(self, name: str) -> Path:
        return self.samples_root / plain_name(name, "sample.name")

    def reranked(self, name: str) -> Path:
        return self.root / "reranked" / plain_name(name, "the samples folder's name")

    def eval_report(self, name: str) -> Path:
        """eval/<name>.json (the .md and sweep files sit beside it)."""
        return self.eval_dir / f"{plain_name(name, 'the eval name')}.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def cache(self) -> Path:
        """Cached reference statistics and other derived data that can be rebuilt."""
        return self.root / "cache"

    def require(self, path: Path, artefact: str) -> Path:
        """``path`` if it exists, else a UserError naming the command that makes it."""
        if not path.exists():
            rel = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            raise UserError(f"{rel} is missing: run `{PRODUCER[artefact]}` first")
        return path


def plain_name(name: str, what: str) -> str:
    """``name`` if it is a plain folder name (no path separators, not '.' or '..'), else a UserError."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(f"{what} = {name!r} must be a plain folder name (no '/', not '.' or '..')")
    return name


def slug(text: str, max_len: int = 60) -> str:
    """A folder-safe name made from a prompt: 'a red circle!' -> 'a-red-circle'. A prompt with no
    ASCII letter or digit ('赤い円') gets 'p-' and 8 hex digits of its hash, so that two differ."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "p-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
