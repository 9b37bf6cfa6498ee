"""CLIP for clipvqd: the one module that imports open_clip.

    clip = load_clip("shapes")                          # the tiny CLIP shipped in the package
    clip = load_clip("ViT-B-32-quickgelu", "/data/openai-b32.safetensors")
    clip = load_clip("ViT-B-32", "openai")              # an open_clip tag: needs the network
    z_img = clip.embed_images(x)    # x: float (N, 3, H, W) in [-1, 1] -> (N, d), unit norm
    z_txt = clip.embed_texts(["a red circle"])          # -> (N, d), unit norm

Every model is loaded the same way: build the architecture from its config
(open_clip's built-in config for a named model; the config stored in the
safetensors metadata for "shapes"), then load a state dict from a local file.
Only an open_clip pretrained *tag* downloads, and offline that fails within
seconds with a `UserError` that says how to use a local file instead.

The trainer of the tiny CLIP (`clipvqd.shapes.train_clip`) also builds and
tokenises through this module (`build_model`, `Tokenizer`), so the shipped
weights and their loader can never disagree about the architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipvqd.checkpoint import load_foreign_weights
from clipvqd.errors import UserError

log = logging.getLogger("clipvqd")

SHAPES_MODEL = "shapes"
SHAPES_WEIGHTS = Path(__file__).parent / "shapes" / "tiny_clip.safetensors"
METADATA_KEY = "clipvqd_clip_config"  # safetensors metadata key holding the JSON config
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image statistics
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
TAG_REACHABILITY_TIMEOUT_S = 3.0


def build_model(model_cfg: dict) -> torch.nn.Module:
    """Build an untrained open_clip CLIP (or CustomTextCLIP) from a config dict.

    `model_cfg` has open_clip's layout: embed_dim, vision_cfg, text_cfg and
    optional flags such as quick_gelu; a "preprocess_cfg" entry is ignored here.
    """
    cfg = {k: v for k, v in model_cfg.items() if k not in ("preprocess_cfg", "custom_text")}
    if "multimodal_cfg" in cfg:
        raise UserError("clip.model: CoCa-style models (with a multimodal decoder) are not supported; use a CLIP model")
    custom_text = model_cfg.get("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


class Tokenizer:
    """open_clip's tokenizer for a model: its own BPE vocabulary ships with open_clip (no network).

    Without `model_name` (the tiny shapes CLIP) it is open_clip's SimpleTokenizer;
    with one, whatever open_clip.get_tokenizer picks for that architecture.
    """

    def __init__(self, context_length: int, model_name: str | None = None):
        self.context_length = context_length
        if model_name is None:
            self._tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        else:
            try:
                self._tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
            except Exception as error:  # e.g. a Hugging Face tokenizer that is not cached, offline
                raise UserError(f"cannot load the tokenizer of clip.model {model_name!r}: {error}") from error

    def token_count(self, text: str) -> int | None:
        """Tokens `text` needs, counting the start and end tokens (None if the tokenizer cannot say)."""
        if not hasattr(self._tokenizer, "encode"):
            return None
        return len(self._tokenizer.encode(text)) + 2

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(N, context_length) int64 token ids; over-long texts are truncated (end token kept)."""
        return self._tokenizer(list(texts))


def save_tiny_clip(model: torch.nn.Module, model_cfg: dict, path: str | Path) -> None:
    """Write a model as one safetensors file: floating tensors in fp16, the config in the metadata."""
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        state[key] = value.half() if value.is_floating_point() else value
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(model_cfg, sort_keys=True)})


@dataclass
class _Spec:
    """What load_clip resolved: a config, a local weights file (or a tag), and a name."""

    model_cfg: dict
    weights: Path | None
    tag: str | None
    name: str


def _read_metadata_config(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise UserError(f"{path} has no clipvqd CLIP config in its metadata; is it a clipvqd tiny CLIP file?")
    return json.loads(metadata[METADATA_KEY])


def _digest(path: Path) -> str:
    """First 12 hex digits of the file's SHA-256: names the exact weights, for provenance."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:12]


def _resolve(model: str, pretrained: str) -> _Spec:
    if model == SHAPES_MODEL:
        path = Path(pretrained) if pretrained else SHAPES_WEIGHTS
        if not path.is_file():
            raise UserError(f"the tiny shapes CLIP weights are missing: {path} (reinstall clipvqd or retrain them "
                            "with `python -m clipvqd.shapes.train_clip --out PATH`)")
        return _Spec(_read_metadata_config(path), path, None, f"shapes:{path.name}@{_digest(path)}")
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise UserError(f"unknown clip.model {model!r}: use 'shapes' or an open_clip architecture name such as "
                        "'ViT-B-32-quickgelu' (OpenAI's weights; see open_clip.list_models())")
    if not pretrained:
        raise UserError(f"clip.pretrained is empty for clip.model {model!r}: point it at a local weights file "
                        "(.safetensors) or an open_clip tag such as 'openai'")
    path = Path(pretrained).expanduser()
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or os.sep in pretrained or path.exists():
        if not path.is_file():
            raise UserError(f"clip.pretrained file not found: {path}")
        return _Spec(model_cfg, path, None, f"{model}:{path.name}@{_digest(path)}")
    if not open_clip.get_pretrained_cfg(model, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(f"clip.pretrained {pretrained!r} is neither a local file nor an open_clip tag of {model!r} "
                        f"(its tags: {tags})")
    return _Spec(model_cfg, None, pretrained, f"{model}:{pretrained}")


def _hosts_of_tag(model: str, tag: str) -> list[tuple[str, int]]:
    cfg = open_clip.get_pretrained_cfg(model, tag)
    hosts = []
    if cfg.get("hf_hub"):
        hosts.append(("huggingface.co", 443))
    if cfg.get("url"):
        parsed = urlparse(cfg["url"])
        hosts.append((parsed.hostname, parsed.port or 443))
    return hosts


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=TAG_REACHABILITY_TIMEOUT_S):
            return True
    except OSError:
        return False


def _load_tag(spec: _Spec, model: str) -> torch.nn.Module:
    """Download-and-build through open_clip, but only after a quick reachability check."""
    hosts = _hosts_of_tag(model, spec.tag)
    if not any(_reachable(host, port) for host, port in hosts):
        raise UserError(f"cannot download open_clip weights {model}:{spec.tag} (no network); download them "
                        "elsewhere and set clip.pretrained to the local file (.safetensors)")
    # A tag's weights were trained with its activation: OpenAI's ViT-B-32 with QuickGELU, which
    # open_clip's "ViT-B-32" config lacks (it only warns and builds GELU, a different network).
    quick_gelu = bool(open_clip.get_pretrained_cfg(model, spec.tag).get("quick_gelu", False))
    try:
        return open_clip.create_model(model, pretrained=spec.tag, force_quick_gelu=quick_gelu)
    except Exception as error:  # download failures surface as assorted exception types
        raise UserError(f"downloading open_clip weights {model}:{spec.tag} failed ({error}); set "
                        "clip.pretrained to a local weights file instead") from error


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a local state dict into `module` (safetensors directly; .pt/.bin with weights_only)."""
    state = load_foreign_weights(path, "CLIP weights")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if "logit_scale" in state and state["logit_scale"].ndim != module.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(module.logit_scale.shape)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("logit_bias")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshapen:
        raise UserError(f"{path} does not fit this CLIP architecture ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, {len(misshapen)} misshapen tensors, e.g. {(missing + unexpected + misshapen)[:3]}); "
                        "check that clip.model names the architecture these weights were trained with")
    module.load_state_dict(state, strict=False)


class Clip:
    """A loaded CLIP in eval mode: unit-norm image and text embeddings, batched, no grad."""

    def __init__(self, module: torch.nn.Module, model_cfg: dict, name: str, device: str | torch.device = "cpu",
                 tokenizer_model: str | None = None):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.name = name
        image_size = model_cfg["vision_cfg"].get("image_size", getattr(module.visual, "image_size", 224))
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
        self.context_length = int(model_cfg["text_cfg"].get("context_length", 77))
        preprocess = model_cfg.get("preprocess_cfg", {})
        self._mean = torch.tensor(preprocess.get("mean", DEFAULT_MEAN), device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess.get("std", DEFAULT_STD), device=self.device).view(1, 3, 1, 1)
        self.tokenizer = Tokenizer(self.context_length, tokenizer_model)
        self.embed_dim = int(model_cfg["embed_dim"])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> the model's input: centre-cropped to a square (as open_clip's
        transform does, not squeezed), resized and normalised."""
        x = (x.to(self.device, torch.float32) + 1.0) / 2.0
        h, w = x.shape[-2:]
        if h != w:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            x = x[..., top:top + side, left:left + side]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp(0.0, 1.0)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, 3, H, W) float in [-1, 1] -> (N, embed_dim) L2-normalised, on the CLIP's device."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        out = [self.module.encode_image(self.preprocess(x[i:i + batch_size]), normalize=True)
               for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Prompts -> (N, embed_dim) L2-normalised. Over-long prompts are truncated with a warning."""
        texts = list(texts)
        for text in texts:
            count = self.tokenizer.token_count(text)
            if count is not None and count > self.context_length:
                shown = text if len(text) <= 80 else text[:77] + "..."
                log.warning("prompt longer than CLIP's %d-token context, truncated: %r", self.context_length, shown)
        out = [self.module.encode_text(self.tokenizer(texts[i:i + batch_size]).to(self.device), normalize=True)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)


def load_clip(model: str, pretrained: str = "", device: str | torch.device = "cpu") -> Clip:
    """Load a CLIP: "shapes" (the shipped tiny CLIP) or an open_clip architecture name.

    `pretrained` is a local weights file (.safetensors preferred; .pt/.bin are
    read with weights_only=True) or, for named models, an open_clip tag such
    as "openai" (which downloads). For "shapes" it may name another tiny CLIP
    file (default: the shipped one).
    """
    spec = _resolve(model, pretrained)
    model_cfg = dict(spec.model_cfg)
    if spec.tag is not None:
        module = _load_tag(spec, model)
    else:
        module = build_model(model_cfg)
        _load_weights(module, spec.weights)
    if model != SHAPES_MODEL:
        model_cfg["preprocess_cfg"] = _named_preprocess(model, spec.tag)
    return Clip(module, model_cfg, spec.name, device, tokenizer_model=None if model == SHAPES_MODEL else model)


def _named_preprocess(model: str, tag: str | None) -> dict:
    """Image mean/std of a named model: its tag's, or (local file) those of its first known tag."""
    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(model)[:1]
    cfg = open_clip.get_pretrained_cfg(model, tags[0]) if tags else {}
    return {"mean": list(cfg.get("mean", DEFAULT_MEAN)), "std": list(cfg.get("std", DEFAULT_STD))}
