"""Every knob of clipvqd: one frozen dataclass per section of the TOML project file.

Precedence: the defaults below < the project file < ``--set section.key=value``
overrides < a command's own sugar options (which write the same fields).
The defaults are sized for the built-in shapes world on a laptop CPU; the
paper's values live in ``examples/ffhq`` and ``examples/coco``.

Each field is declared with ``knob(default, "one-line help", **limits)``;
limits are checked at load time and every error names the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli

from clipvqd.errors import UserError


SEED_MAX = 2**62  # torch seeds are 64-bit; headroom for the offsets added to them (sample i: seed + i)


def knob(default, help: str, *, ge=None, gt=None, le=None, lt=None):
    """A config field with its one-line help and optional numeric limits."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ProjectConfig:
    seed: int = knob(0, "master seed; every random draw derives from it", ge=0, le=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "where to run: auto picks cuda when available")
    mixed_precision: Literal["no", "bf16", "fp16"] = knob("no", "autocast precision for training and sampling (bf16 on a CPU needs AMX or AVX512-BF16; elsewhere torch emulates it, far slower than fp32)")
    grad_accum: int = knob(1, "gradient accumulation steps", ge=1)
    num_workers: int = knob(0, "image-decoding worker processes for train-vq and tokenize", ge=0)
    threads: int = knob(0, "torch CPU threads (0 = torch's default)", ge=0)


@dataclass(frozen=True)
class DataConfig:
    source: Literal["folder", "hf", "shapes"] = knob("shapes", "folder of images | saved Hugging Face dataset | built-in shapes world")
    path: str = knob("", "image folder or saved dataset (folder and hf sources)")
    image_size: int = knob(32, "training resolution in pixels (short side resized, centre-cropped)", ge=8)
    count: int = knob(5000, "number of generated training images (shapes source)", ge=1)
    seed: int = knob(0, "seed of the generated training set (shapes source)", ge=0, le=SEED_MAX)
    hf_split: str = knob("train", "split to use when a saved dataset has several")
    hf_image_column: str = knob("image", "column holding the images (hf source)")


@dataclass(frozen=True)
class ClipConfig:
    model: str = knob("shapes", "'shapes' (the shipped tiny CLIP) or an open_clip architecture such as "
                      "ViT-B-32-quickgelu (the one OpenAI's weights need)")
    pretrained: str = knob("", "local weights file, or an open_clip tag such as 'openai' (needs network)")
    batch_size: int = knob(64, "images or texts per CLIP forward", ge=1)


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = knob(1024, "K: number of codebook entries (tokens)", ge=2, le=65535)
    embed_dim: int = knob(64, "d: codebook vector width", ge=1)
    base_channels: int = knob(16, "channels of the first encoder level", ge=1)
    channel_mult: tuple[int, ...] = knob((1, 2, 2), "channel multiplier per level; downsampling f = 2**(levels-1)")
    num_res_blocks: int = knob(1, "residual blocks per level", ge=1)
    attn_resolutions: tuple[int, ...] = knob((), "feature-map sizes (pixels) that get self-attention")
    tau_start: float = knob(1.0, "Gumbel temperature at the first step", gt=0)
    tau_end: float = knob(0.1, "Gumbel temperature at the last step (cosine decay)", gt=0)
    kl_weight: float = knob(5e-5, "weight of the KL to the uniform prior over codes", ge=0)
    gumbel_noise: float = knob(0.0, "scale of the Gumbel noise in training (1 = the paper; 0 = straight-through argmax, fastest on a CPU)", ge=0)
    soft_fraction: float = knob(0.5, "share of train-vq steps (from the start) on the soft relaxation, tau decaying over them; then hard codes (0 = the paper)", ge=0, lt=1)
    mid_attention: bool = knob(True, "self-attention in the mid blocks (taming, the paper); off reconstructed the shapes world as well (RESULTS.md)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TrainVQConfig:
    steps: int = knob(3000, "optimisation steps", ge=1)
    batch_size: int = knob(16, "images per step per process", ge=1)
    lr: float = knob(2e-3, "Adam learning rate (per image if scale_lr)", gt=0)
    scale_lr: bool = knob(False, "multiply lr by the global batch size (the paper: 4.5e-6 x batch)")
    lr_final: float = knob(0.1, "cosine-decay the lr to this fraction by the last step (1 = constant, the paper)", gt=0, le=1)
    l1_weight: float = knob(0.0, "weight of the L1 reconstruction loss (the paper: 1)", ge=0)
    l2_weight: float = knob(1.0, "weight of the squared-error reconstruction loss (the paper: 0)", ge=0)
    edge_weight: float = knob(16.0, "weight of the squared error counted on the images' edges (the paper: 0)", ge=0)
    perceptual_weight: float = knob(0.0, "weight of the LPIPS-style VGG16 loss (needs perceptual_weights)", ge=0)
    perceptual_weights: str = knob("", "local VGG16 weights file for the perceptual loss")
    lpips_weights: str = knob("", "local LPIPS v0.1 vgg.pth: its channel weights make the perceptual loss "
                              "LPIPS (the paper); empty = all channels weighted 1")
    disc_start: int = knob(100000, "step at which the PatchGAN discriminator switches on", ge=0)
    disc_weight: float = knob(0.8, "base weight of the adaptive adversarial loss", ge=0)
    disc_channels: int = knob(64, "discriminator base channels", ge=1)
    ema_decay: float = knob(0.0, "EMA decay of the autoencoder weights (0 = off)", ge=0, lt=1)
    log_every: int = knob(50, "steps between log lines", ge=1)
    save_every: int = knob(500, "steps between resumable checkpoints", ge=1)
    preview_every: int = knob(500, "steps between preview grids (originals over reconstructions)", ge=1)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = knob(100, "T: number of diffusion steps", ge=2)
    keep_start: float = knob(0.99999, "cumulative keep probability at t=1", gt=0, le=1)
    keep_end: float = knob(0.000009, "cumulative keep probability at t=T", gt=0, le=1)
    mask_start: float = knob(0.000009, "cumulative mask probability at t=1", gt=0, le=1)
    mask_end: float = knob(0.99999, "cumulative mask probability at t=T", gt=0, le=1)
    aux_weight: float = knob(5e-4, "weight of the auxiliary x0 cross-entropy (scaled by 2 - t/T)", ge=0)


@dataclass(frozen=True)
class TransformerConfig:
    layers: int = knob(4, "transformer blocks", ge=1)
    width: int = knob(128, "model width", ge=8)
    heads: int = knob(4, "attention heads (must divide width)", ge=1)
    mlp: Literal["conv", "dwconv", "linear"] = knob("conv", "MLP of each block: 3x3 convs on the token grid (paper), dwconv (linear, depthwise 3x3, linear: 1.7-1.9x the training steps/s; in one shapes trial as accurate as conv at equal training time, not at equal steps) or linear (drew blobs there; RESULTS.md)")
    mlp_ratio: int = knob(2, "MLP hidden width = mlp_ratio x width (the paper: 4)", ge=1)


@dataclass(frozen=True)
class TrainDiffusionConfig:
    steps: int = knob(4000, "optimisation steps", ge=1)
    batch_size: int = knob(32, "token grids per step per process", ge=1)
    lr: float = knob(1e-3, "AdamW peak learning rate (per sample if scale_lr)", gt=0)
    scale_lr: bool = knob(False, "multiply lr by the global batch size (VQ-Diffusion: 3e-6 x batch)")
    weight_decay: float = knob(4.5e-2, "AdamW weight decay", ge=0)
    warmup_steps: int = knob(100, "linear warmup steps", ge=0)
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0 = off)", ge=0)
    ema_decay: float = knob(0.99, "EMA decay of the weights (0 = off)", ge=0, lt=1)
    alpha: float = knob(0.5, "pseudo-text noise: h' = norm(norm(f_img) + alpha e/|e|)", ge=0)
    log_every: int = knob(50, "steps between log lines", ge=1)
    save_every: int = knob(500, "steps between resumable checkpoints", ge=1)


@dataclass(frozen=True)
class FinetuneCfgConfig:
    steps: int = knob(400, "optimisation steps of the guidance fine-tune", ge=1)
    batch_size: int = knob(32, "token grids per step per process", ge=1)
    lr: float = knob(3e-4, "AdamW peak learning rate (per sample if scale_lr)", gt=0)
    scale_lr: bool = knob(False, "multiply lr by the global batch size")
    warmup_steps: int = knob(50, "linear warmup steps", ge=0)
    drop_prob: float = knob(0.1, "probability of replacing the condition by the learned null vector", ge=0, le=1)
    raw_null_at_inference: bool = knob(False, "reproduce the reference: normalised null in training, raw at sampling")
    log_every: int = knob(20, "steps between log lines", ge=1)
    save_every: int = knob(250, "steps between resumable checkpoints", ge=1)


@dataclass(frozen=True)
class SampleConfig:
    steps: int = knob(100, "reverse steps (< T visits a strided subset with the exact posterior)", ge=1)
    guidance: float = knob(3.0, "classifier-free guidance scale s (1 = off)", ge=0)
    truncation: float = knob(0.9, "keep the most likely classes up to this cumulative probability", gt=0, le=1)
    n: int = knob(16, "samples per prompt", ge=1)
    batch_size: int = knob(16, "samples per denoiser forward", ge=1)
    seed: int = knob(0, "seed of the first sample; sample i uses seed + i", ge=0, le=SEED_MAX)
    model: Literal["auto", "cfg", "base"] = knob("auto", "auto = the guidance fine-tune if present, else the base model")
    name: str = knob("", "output folder under samples/ (default: made from the prompt)")
    rerank: bool = knob(False, "rerank the samples by CLIP score as they are written")


@dataclass(frozen=True)
class RerankConfig:
    keep: int = knob(1, "best samples kept per prompt", ge=1)


@dataclass(frozen=True)
class EvalConfig:
    protocol: Literal["shapes", "ffhq64", "coco"] = knob("shapes", "evaluation protocol")
    fid: bool = knob(True, "compute FID")
    inception_score: bool = knob(True, "compute Inception Score")
    clip_score: bool = knob(True, "compute CLIP score")
    judge: bool = knob(True, "shapes world: the judge's attribute accuracy")
    features: Literal["auto", "inception", "clip"] = knob("auto", "FID/IS network: auto = clip for the shapes world, else inception")
    inception_weights: str = knob("", "local clean-fid Inception file (offline use); empty = clean-fid's cache")
    reference_path: str = knob("", "folder of real images for FID (shapes: generated when empty)")
    reference_count: int = knob(1000, "reference images generated for the shapes world", ge=2)
    samples_per_prompt: int = knob(16, "candidates sampled per prompt", ge=1)
    max_prompts: int = knob(0, "use N prompts evenly spread through each set (0 = all)", ge=0)
    prompts_file: str = knob("", "prompts for ffhq64 (default: the paper's 64) or a custom list")
    captions_file: str = knob("", "captions for the coco protocol, one a line")
    caption_count: int = knob(30000, "random captions drawn for the coco protocol", ge=1)
    batch_size: int = knob(64, "images per feature-extractor forward", ge=1)


@dataclass(frozen=True)
class Config:
    project: ProjectConfig = field(default_factory=ProjectConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    train_vq: TrainVQConfig = field(default_factory=TrainVQConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    train_diffusion: TrainDiffusionConfig = field(default_factory=TrainDiffusionConfig)
    finetune_cfg: FinetuneCfgConfig = field(default_factory=FinetuneCfgConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def replace(self, **sections) -> "Config":
        """A copy with whole sections or ``{"section.key": value}`` changed."""
        return apply_values(self, sections, source="code")


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------- parsing


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else f" (valid: {', '.join(sorted(options))})"


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _expected(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of integers"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[tp]


def _coerce(value: Any, tp, from_text: bool):
    """Convert ``value`` to type ``tp``; raise ValueError when it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError
        return value
    if origin is tuple:
        if from_text:
            text = value.strip().strip("[]()").strip()
            value = [v for v in (p.strip() for p in text.split(",")) if v]
            return tuple(int(v) for v in value)
        if not isinstance(value, (list, tuple)) or not all(type(v) is int for v in value):
            raise ValueError
        return tuple(value)
    if tp is bool:
        if from_text:
            low = value.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if type(value) is not bool:
            raise ValueError
        return value
    if tp is int:
        if from_text:
            return int(value.strip())
        if type(value) is not int:
            raise ValueError
        return value
    if tp is float:
        if from_text:
            value = float(value.strip())
        elif type(value) not in (int, float):
            raise ValueError
        if not math.isfinite(value):  # nan/inf pass every range check; no knob wants them
            raise ValueError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    raise TypeError(f"unsupported config type {tp}")


def _check_limits(key: str, value, meta, where: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for name, bad, text in (
            ("ge", lambda v, b: v < b, ">="),
            ("gt", lambda v, b: v <= b, ">"),
            ("le", lambda v, b: v > b, "<="),
            ("lt", lambda v, b: v >= b, "<"),
        ):
            bound = meta.get(name)
            if bound is not None and bad(v, bound):
                raise UserError(f"{where}: {key} = {value!r} is out of range: expected {text} {bound}")


def apply_values(config: Config, values: dict[str, Any], source: str, from_text: bool = False,
                 check: bool = True) -> Config:
    """Set ``{"section.key": value}`` or ``{"section": {key: value}}`` on a config.

    ``source`` names where the values came from (a file, ``--set``) for errors.
    With ``from_text`` the values are strings parsed by each field's type.
    ``check=False`` leaves the checks across keys to the caller.
    """
    flat: dict[tuple[str, str], Any] = {}
    for name, value in values.items():
        if "." in name:
            section, key = name.split(".", 1)
            flat[(section, key)] = value
        elif isinstance(value, dict):
            for key, v in value.items():
                flat[(name, key)] = v
        elif dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                flat[(name, f.name)] = getattr(value, f.name)
        else:
            raise UserError(f"{source}: '{name}' is not a section (sections: {', '.join(SECTIONS)})")
    updates: dict[str, dict[str, Any]] = {}
    for (section, key), value in flat.items():
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section [{section}]{_closest(section, SECTIONS)}")
        cls = SECTIONS[section]
        types = _field_types(cls)
        if key not in types:
            raise UserError(
                f"{source}: unknown key {section}.{key}"
                + _closest(key, types).replace("mean ", f"mean {section}.")
            )
        try:
            coerced = _coerce(value, types[key], from_text and isinstance(value, str))
        except (ValueError, TypeError):
            raise UserError(
                f"{source}: {section}.{key} = {value!r} is not valid: expected {_expected(types[key])}"
            ) from None
        meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
        _check_limits(f"{section}.{key}", coerced, meta, source)
        updates.setdefault(section, {})[key] = coerced
    new_sections = {
        s: dataclasses.replace(getattr(config, s), **kv) for s, kv in updates.items()
    }
    result = dataclasses.replace(config, **new_sections)
    if check:
        check_config(result, source)
    return result


def check_config(config: Config, source: str) -> None:
    """Checks that involve more than one field."""
    vq, data, tr = config.vq, config.data, config.transformer
    if len(vq.channel_mult) < 3 or vq.downsample not in (4, 8, 16):
        raise UserError(
            f"{source}: vq.channel_mult = {list(vq.channel_mult)} gives downsampling factor {vq.downsample}: "
            "expected 3, 4 or 5 levels (f = 4, 8 or 16)"
        )
    if any(m < 1 for m in vq.channel_mult):
        raise UserError(f"{source}: vq.channel_mult entries must be >= 1")
    if data.image_size % vq.downsample:
        raise UserError(
            f"{source}: data.image_size = {data.image_size} is not divisible by the VQ downsampling factor "
            f"{vq.downsample} (from vq.channel_mult)"
        )
    if vq.tau_end > vq.tau_start:
        raise UserError(f"{source}: vq.tau_end = {vq.tau_end} must not exceed vq.tau_start = {vq.tau_start}")
    if tr.width % tr.heads:
        raise UserError(f"{source}: transformer.width = {tr.width} is not divisible by transformer.heads = {tr.heads}")
    if (tr.width // tr.heads) % 2:
        raise UserError(f"{source}: transformer.width / transformer.heads must be even")
    if config.sample.steps > config.diffusion.timesteps:
        raise UserError(
            f"{source}: sample.steps = {config.sample.steps} exceeds diffusion.timesteps = {config.diffusion.timesteps}"
        )
    d = config.diffusion
    if d.keep_end >= d.keep_start or d.mask_end <= d.mask_start or d.keep_start + d.mask_start > 1 or d.keep_end + d.mask_end > 1:
        raise UserError(
            f"{source}: the diffusion schedule needs keep_start > keep_end, mask_start < mask_end, "
            "and keep + mask <= 1 at both ends"
        )
    from clipvqd.diffusion import Schedule  # the schedule's own checks, now rather than at training time

    try:
        Schedule(config.vq.codebook_size, d.timesteps, d.keep_start, d.keep_end, d.mask_start, d.mask_end)
    except UserError as e:
        raise UserError(f"{source}: [diffusion] {e}") from None


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                options: dict[str, str] | None = None) -> Config:
    """Defaults < the TOML file at ``path`` (if given) < ``section.key=value`` overrides (``--set``)
    < ``options`` (``{"section.key": text}`` from a command's own options, such as ``--steps``)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path} is a directory: pass the project file inside it (for example {path / 'clipvqd.toml'})")
        if not path.exists():
            raise UserError(f"no project file at {path}: create one with `clipvqd init DIR --example shapes`")
        try:
            with open(path, "rb") as fh:
                table = tomli.load(fh)
        except tomli.TOMLDecodeError as exc:
            raise UserError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read: {exc.strerror}") from None
        for section, value in table.items():
            if not isinstance(value, dict):
                raise UserError(f"{path}: '{section}' must be a [section] table{_closest(section, SECTIONS)}")
        config = apply_values(config, table, source=str(path))
    if overrides:
        parsed = {}
        for item in overrides:
            if "=" not in item or "." not in item.split("=", 1)[0]:
                raise UserError(f"--set {item!r}: expected section.key=value")
            key, value = item.split("=", 1)
            parsed[key.strip()] = value
        config = apply_values(config, parsed, source="--set", from_text=True, check=not options)
    if options:  # the whole command line is checked together: --set and options may only agree jointly
        config = apply_values(config, options, source="command-line options", from_text=True, check=False)
        check_config(config, "--set and command-line options" if overrides else "command-line options")
    return config


def config_to_dict(config) -> dict:
    """A plain, JSON-ready dict of a config or one section (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(config)


def config_from_dict(values: dict) -> Config:
    """Inverse of :func:`config_to_dict` (used to rebuild models from their files)."""
    return apply_values(Config(), values, source="stored config")


def describe_fields(section: str) -> list[tuple[str, Any, str]]:
    """(key, default, help) for each field of a section: used to write commented project files."""
    cls = SECTIONS[section]
    return [(f.name, f.default, f.metadata["help"]) for f in dataclasses.fields(cls)]
