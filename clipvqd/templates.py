"""The example project files (`clipvqd init --example NAME`), written from one
source: each example is a set of values over the defaults of clipvqd.config,
and the file lists every key of every section with its one-line help; and the
one edit a command makes to a project file (`train-vq DIR` records DIR).

``examples/<name>/clipvqd.toml`` in the repository is exactly this output
(a test holds them equal)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tomli

from clipvqd.config import SECTIONS, apply_values, Config, config_to_dict, describe_fields
from clipvqd.errors import UserError

HEADERS = {
    "shapes": (
        "The built-in shapes world: the whole pipeline offline on a laptop CPU.\n"
        "Sized for a 2-core CPU: 32 px images, 8x8 tokens, a 4-layer denoiser; the demo runs it in minutes."
    ),
    "ffhq": (
        "FFHQ at 256 px with OpenAI's CLIP ViT-B/32: the paper's recipe (Section 5.5, Table 1).\n"
        "Needs a GPU. Put the images in ffhq/images256, a VGG16 weights file at vgg16.safetensors and\n"
        "LPIPS's weights/v0.1/vgg.pth at lpips_vgg.pth (or set train_vq.perceptual_weight = 0).\n"
        "clip.pretrained = 'openai' downloads once; offline, point it at a local file.\n"
        "Values marked (not in the paper) are our choices."
    ),
    "coco": (
        "MS-COCO 2014 at 256 px with OpenAI's CLIP ViT-B/32: the paper's recipe (Table 1, Table 2).\n"
        "Needs a GPU. Training uses the images only; the captions file serves evaluation.\n"
        "The perceptual loss needs vgg16.safetensors and LPIPS's weights/v0.1/vgg.pth at lpips_vgg.pth.\n"
        "Values marked (not in the paper) are our choices."
    ),
}

_PAPER_VQ = {
    "codebook_size": 4096, "embed_dim": 256, "base_channels": 128, "channel_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2, "attn_resolutions": [16], "mid_attention": True, "tau_start": 0.9, "tau_end": 0.01, "kl_weight": 5e-5, "gumbel_noise": 1.0,
    "soft_fraction": 0.0,
}
_PAPER_TRANSFORMER = {"layers": 24, "width": 512, "heads": 16, "mlp": "conv", "mlp_ratio": 4}


def _paper(path: str, steps_vq: int, alpha: float, guidance: float, truncation: float, eval_: dict) -> dict:
    return {
        "project": {"mixed_precision": "bf16", "num_workers": 8},
        "data": {"source": "folder", "path": path, "image_size": 256},
        "clip": {"model": "ViT-B-32-quickgelu", "pretrained": "openai", "batch_size": 256},
        "vq": _PAPER_VQ,
        "train_vq": {
            "steps": steps_vq, "batch_size": 32, "lr": 4.5e-6, "scale_lr": True, "lr_final": 1.0, "disc_start": 25000,
            "l1_weight": 1.0, "l2_weight": 0.0, "edge_weight": 0.0,
            "perceptual_weight": 1.0, "perceptual_weights": "vgg16.safetensors",
            "lpips_weights": "lpips_vgg.pth", "disc_weight": 0.8,
            "save_every": 5000, "preview_every": 5000, "log_every": 100,
        },
        "diffusion": {"aux_weight": 5e-4},
        "transformer": _PAPER_TRANSFORMER,
        "train_diffusion": {
            "steps": 200000, "batch_size": 32, "lr": 3e-6, "scale_lr": True, "weight_decay": 4.5e-2,
            "warmup_steps": 1000, "grad_clip": 1.0, "ema_decay": 0.999, "alpha": alpha,
            "save_every": 5000, "log_every": 100,
        },
        "finetune_cfg": {"steps": 20000, "batch_size": 32, "lr": 3e-6, "scale_lr": True, "warmup_steps": 500,
                         "drop_prob": 0.1, "save_every": 5000, "log_every": 100},
        "sample": {"steps": 100, "guidance": guidance, "truncation": truncation, "n": 16, "batch_size": 16},
        "rerank": {"keep": 1},
        "eval": {"features": "inception", **eval_},
    }


EXAMPLES: dict[str, dict] = {
    "shapes": {
        "project": {"seed": 0, "device": "auto", "mixed_precision": "no"},
        "data": {"source": "shapes", "image_size": 32, "count": 5000},
        "clip": {"model": "shapes"},
    },
    "ffhq": _paper("ffhq/images256", 218750, 0.5, 1.15, 0.85, {"protocol": "ffhq64", "reference_path": "ffhq/images256"}),
    "coco": _paper(
        "coco/train2014", 258750, 0.25, 3.0, 0.9,
        {"protocol": "coco", "reference_path": "coco/val2014", "captions_file": "coco/captions_val2014.txt",
         "caption_count": 30000, "samples_per_prompt": 1},
    ),
}

# Keys whose example values the paper does not state (marked '(not in the paper)' in the files).
NOT_IN_PAPER = {
    "train_vq.steps": "100 epochs at batch 32", "train_diffusion.steps": None, "train_diffusion.batch_size": None,
    "train_diffusion.ema_decay": None, "train_diffusion.warmup_steps": None, "train_diffusion.grad_clip": None,
    "finetune_cfg.steps": None, "finetune_cfg.lr": None, "finetune_cfg.warmup_steps": None,
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def render_project_file(example: str) -> str:
    """The commented TOML text of an example project."""
    if example not in EXAMPLES:
        raise UserError(f"unknown example '{example}': choose one of {', '.join(EXAMPLES)}")
    config: Config = apply_values(Config(), EXAMPLES[example], source=f"example {example}")
    values = config_to_dict(config)
    lines = [f"# clipvqd project file: {example}", *(f"# {h}" for h in HEADERS[example].splitlines()),
             "# Every key is listed with its meaning; override any on the command line with --set section.key=value.", ""]
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for key, _default, help_text in describe_fields(section):
            note = ""
            if example != "shapes" and f"{section}.{key}" in NOT_IN_PAPER:
                extra = NOT_IN_PAPER[f"{section}.{key}"]
                note = f" ({extra}; not in the paper)" if extra else " (not in the paper)"
            lines.append(f"# {help_text}{note}")
            lines.append(f"{key} = {_toml_value(values[section][key])}")
        lines.append("")
    return "\n".join(lines)


def write_project_file(directory: Path, example: str, force: bool = False) -> Path:
    """Write ``directory/clipvqd.toml`` for ``example``; refuse to overwrite unless ``force``."""
    text = render_project_file(example)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a folder")
    path = directory / "clipvqd.toml"
    if path.exists() and not force:
        raise UserError(f"{path} already exists: pass --force to overwrite it")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def record_image_folder(project_file: Path, folder: Path) -> tuple[str, bool] | None:
    """Make the project file read ``folder`` (``[data] source = "folder"``, ``path``), so that the stages
    after `train-vq DIR` (tokenize) read the images the tokenizer was trained on.

    ``[eval] reference_path`` follows when it named the same folder as ``data.path`` did (the paper
    examples' FID against the training images). Returns (the path as written, relative to the project
    folder when inside it; whether reference_path followed), or None when the file already reads that
    folder. Only those lines change (added if missing); every other byte stays. A file this line edit
    cannot handle (keys written in another form) is a UserError that says what to set by hand, and the
    file is left as it was.
    """
    from clipvqd import checkpoint

    project_file = Path(project_file)
    root, folder = project_file.resolve().parent, Path(folder).expanduser().resolve()
    text = project_file.read_text(encoding="utf-8")
    table = tomli.loads(text)
    data, evaluation = table.get("data", {}), table.get("eval", {})
    current = data.get("path")
    if data.get("source") == "folder" and current and _resolved(root, current) == folder:
        return None
    value = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)
    value = value or "."
    follow = bool(data.get("source") == "folder" and current and evaluation.get("reference_path")
                  and _resolved(root, evaluation["reference_path"]) == _resolved(root, current))
    wanted = {**table, "data": {**data, "source": "folder", "path": value}}
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    _set_in_table(lines, "data", {"source": "folder", "path": value})
    if follow:
        wanted["eval"] = {**evaluation, "reference_path": value}
        _set_in_table(lines, "eval", {"reference_path": value})
    edited = "".join(lines)
    try:
        ok = tomli.loads(edited) == wanted
    except tomli.TOMLDecodeError:
        ok = False
    if not ok:
        also = f" (and reference_path = {json.dumps(value)} under [eval])" if follow else ""
        raise UserError(
            f"{project_file}: cannot record the image folder in its [data] table (written in a form this edit "
            f"does not handle); set source = \"folder\" and path = {json.dumps(value)} under [data]{also} yourself"
        )
    checkpoint.atomic_write_text(project_file, edited)
    return value, follow


def _resolved(root: Path, path: str) -> Path:
    return (root / Path(path).expanduser()).resolve()


def _set_in_table(lines: list[str], name: str, values: dict[str, str]) -> None:
    """Set ``key = "value"`` lines in the ``[name]`` table of a TOML file's lines, in place: a line that
    sets the key is replaced, a missing key goes first in the table, a missing table at the end."""
    new = {key: f"{key} = {json.dumps(v, ensure_ascii=False)}\n" for key, v in values.items()}
    header = next((i for i, line in enumerate(lines) if re.match(rf"\s*\[\s*{name}\s*\]\s*(#.*)?$", line)), None)
    if header is None:
        lines += ["\n", f"[{name}]\n", *new.values()]
        return
    end = next((i for i in range(header + 1, len(lines)) if re.match(r"\s*\[", lines[i])), len(lines))
    for key, line in new.items():
        at = next((i for i in range(header + 1, end) if re.match(rf"\s*{key}\s*=", lines[i])), None)
        if at is None:
            lines.insert(header + 1, line)
            end += 1
        else:
            lines[at] = line
