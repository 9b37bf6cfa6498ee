"""FID and Inception Score through clean-fid: feature extractors, image folders, cached reference statistics.

The one module (with the eval stage) that imports clean-fid. Images are read
and resized exactly as clean-fid's "clean" mode does (PIL bicubic on float
pixels to 299 x 299, no crop: a non-square image is squeezed), by clean-fid's
own ``ResizeDataset``; the features then go through one of two extractors:

    InceptionExtractor(path)   clean-fid's Inception (inception-2015-12-05.pt):
                               2048-d pool features; IS logits = features @ W^T
                               (the output layer without its bias, as
                               StyleGAN2-ADA and torch-fidelity compute IS)
    ClipExtractor(clip, texts) a CLIP image tower (unit-norm embeddings), for
                               worlds without Inception (the shapes world);
                               IS "logits" = 100 * cosine to the class texts, so
                               IS is a zero-shot score over those classes

The Fréchet distance itself is ``clipvqd.metrics.frechet_distance``.
Reference statistics of a real image folder are computed once and cached
(keyed by folder path, file count, newest file time and extractor name).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from cleanfid import downloads_helper
from cleanfid.utils import EXTENSIONS, ResizeDataset

from clipvqd.errors import UserError
from clipvqd.metrics import feature_statistics

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = downloads_helper.inception_url
# Where clean-fid itself keeps the Inception file (cleanfid.features.feature_extractor).
CLEANFID_CACHE_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
REACHABILITY_TIMEOUT_S = 3.0
_SUFFIXES = {e.lower() for e in EXTENSIONS} - {"npy"}


# --------------------------------------------------------------------------- the Inception file


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=REACHABILITY_TIMEOUT_S):
            return True
    except OSError:
        return False


def inception_path(weights: str | Path | None) -> Path:
    """The Inception file: ``weights`` if given, else clean-fid's cache, downloading only when online.

    Offline with neither, one UserError within a few seconds (no hang, no traceback)."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"eval.inception_weights: no such file {path}")
        return path
    cached = CLEANFID_CACHE_DIR / INCEPTION_FILE
    if cached.is_file():
        return cached
    if not _reachable(INCEPTION_URL):
        raise UserError(f"FID/IS need clean-fid's Inception file {INCEPTION_FILE} and there is no network: download "
                        f"{INCEPTION_URL} elsewhere and set eval.inception_weights to it")
    try:
        return Path(downloads_helper.check_download_inception(fpath=str(CLEANFID_CACHE_DIR)))
    except Exception as error:  # network failures come as assorted exception types
        raise UserError(f"downloading {INCEPTION_URL} failed ({error}); set eval.inception_weights to a local copy") from error


# --------------------------------------------------------------------------- extractors


class InceptionExtractor:
    """clean-fid's Inception on clean-mode batches (B, 3, 299, 299) in [0, 255] -> (B, 2048)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        try:
            base = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as error:
            raise UserError(f"{path} is not clean-fid's Inception TorchScript file ({error})") from error
        if not hasattr(base, "layers") or not hasattr(base, "output"):
            raise UserError(f"{path} lacks the 'layers'/'output' parts of clean-fid's Inception file")
        self.layers = base.layers
        self.output_weight = base.output.weight.detach().float()
        self.name = f"inception:{Path(path).name}"
        self.is_label = "IS (Inception logits, no output bias)"

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = (batch.to(self.device, torch.float32) - 128) / 128  # as cleanfid's InceptionV3W
        return self.layers.forward(x).reshape(len(x), -1)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Class logits (N, 1008) from pool features (N, 2048)."""
        return features.astype(np.float64) @ self.output_weight.cpu().double().numpy().T


class ClipExtractor:
    """A CLIP image tower on clean-mode batches: (B, 3, 299, 299) in [0, 255] -> unit embeddings (B, d).

    ``class_texts`` (optional) are the classes of the zero-shot IS."""

    def __init__(self, clip, class_texts: list[str] | None = None, label: str = "CLIP"):
        self.clip = clip
        self.name = f"clip:{clip.name}"
        self.class_texts = list(class_texts or [])
        self._class_emb = clip.embed_texts(self.class_texts).float().cpu().double().numpy() if class_texts else None
        self.is_label = f"IS ({label} zero-shot over {len(self.class_texts)} classes, not Inception)"

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.clip.embed_images(batch.float() / 127.5 - 1.0).float()

    def logits(self, features: np.ndarray) -> np.ndarray:
        """100 x cosine to each class text: softmax of this is the zero-shot probability."""
        if self._class_emb is None:
            raise ValueError("this ClipExtractor has no class texts, so no zero-shot IS")
        feats = features.astype(np.float64)
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        return 100.0 * feats @ self._class_emb.T


# --------------------------------------------------------------------------- folders and features


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, the extensions clean-fid reads), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in _SUFFIXES)


def extract(files: list[Path], extractor, batch_size: int = 64, logits: bool = False):
    """Features (N, D) of image files (clean-fid "clean" resize), and the extractor's logits if asked."""
    if not files:
        raise UserError("no images to measure")
    loader = torch.utils.data.DataLoader(_NamedResizeDataset([str(f) for f in files], mode="clean"),
                                         batch_size=batch_size, shuffle=False, num_workers=0)
    feats = []
    for batch in loader:
        feats.append(extractor(batch).detach().cpu().numpy())
    features = np.concatenate(feats)
    return features, (extractor.logits(features) if logits else None)


class _NamedResizeDataset(ResizeDataset):
    """clean-fid's dataset, with a file it cannot decode reported as a UserError naming the file."""

    def __getitem__(self, i):
        try:
            return super().__getitem__(i)
        except Exception as error:  # PIL's many ways to fail on a broken file
            raise UserError(f"cannot read {self.files[i]} as an image ({type(error).__name__}): "
                            "repair or remove it, then rerun") from None


def _cache_key(folder: Path, files: list[Path], extractor_name: str) -> str:
    """Changes when any file is added, removed, renamed or rewritten: each file's name, size, mtime and
    ctime count (ctime too, because cp -p, tar and rsync -t put back an older mtime on new content)."""
    h = hashlib.sha256(json.dumps([str(folder.resolve()), extractor_name]).encode())
    for f in files:
        st = os.stat(f)
        h.update(json.dumps([str(Path(f).relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ctime_ns]).encode())
    return h.hexdigest()[:20]


def reference_statistics(folder: str | Path, extractor, cache_dir: str | Path,
                         batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, image count) of a real image folder, from ``cache_dir`` when already computed."""
    folder = Path(folder)
    files = image_files(folder)
    if len(files) < 2:
        raise UserError(f"{folder}: FID needs at least 2 reference images, found {len(files)}")
    cache = Path(cache_dir) / f"fid-reference-{_cache_key(folder, files, extractor.name)}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return stored["mu"], stored["sigma"], int(stored["count"])
    features, _ = extract(files, extractor, batch_size)
    mu, sigma = feature_statistics(features)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, count=len(files), folder=str(folder.resolve()), extractor=extractor.name)
    os.replace(tmp, cache)
    return mu, sigma, len(files)
