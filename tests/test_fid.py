"""clipvqd.fid against clean-fid itself, the reference-statistics cache, and the offline Inception path."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clipvqd import fid
from clipvqd.errors import UserError
from clipvqd.metrics import feature_statistics, frechet_distance


class LinearExtractor:
    """A tiny deterministic extractor: 8x8 average-pooled pixels through a fixed random linear map.

    Counts its calls so tests can see whether features were recomputed."""

    name = "linear-test"
    is_label = "IS (test)"

    def __init__(self, dim: int = 12):
        g = torch.Generator().manual_seed(7)
        self.weight = torch.randn(3 * 8 * 8, dim, generator=g, dtype=torch.float32) / 20
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(batch.float() / 255, 8).flatten(1)
        return pooled @ self.weight

    def logits(self, features):
        return np.asarray(features, dtype=np.float64)[:, :5] * 10


def _folder(path, count: int, seed: int, size: int = 32):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-60, 60, size=(size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path / f"{i:03d}.png")
    return path


def test_fid_equals_clean_fid_compute_fid(tmp_path):
    from cleanfid import fid as cleanfid_fid

    gen = _folder(tmp_path / "gen", 20, seed=1)
    ref = _folder(tmp_path / "ref", 22, seed=2, size=40)  # another size: clean mode resizes both to 299
    extractor = LinearExtractor()
    mu, sigma, count = fid.reference_statistics(ref, extractor, tmp_path / "cache", batch_size=8)
    assert count == 22
    features, _ = fid.extract(fid.image_files(gen), extractor, batch_size=8)
    ours = frechet_distance(*feature_statistics(features), mu, sigma)
    theirs = cleanfid_fid.compute_fid(str(gen), str(ref), mode="clean", custom_feat_extractor=extractor,
                                      num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    assert ours > 0.01
    assert ours == pytest.approx(float(theirs), rel=1e-6)


def test_reference_statistics_cached_and_invalidated(tmp_path):
    ref = _folder(tmp_path / "ref", 6, seed=3)
    extractor = LinearExtractor()
    first = fid.reference_statistics(ref, extractor, tmp_path / "cache", batch_size=4)
    calls = extractor.calls
    assert calls == 2
    second = fid.reference_statistics(ref, extractor, tmp_path / "cache", batch_size=4)
    assert extractor.calls == calls  # reused, not recomputed
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    _folder(tmp_path / "extra", 1, seed=9)
    (tmp_path / "extra" / "000.png").rename(ref / "new.png")
    third = fid.reference_statistics(ref, extractor, tmp_path / "cache", batch_size=4)
    assert extractor.calls > calls and third[2] == 7
    assert not np.allclose(third[0], first[0])
    other = LinearExtractor()
    other.name = "another-extractor"
    fid.reference_statistics(ref, other, tmp_path / "cache", batch_size=4)
    assert other.calls == 2  # the extractor name is part of the key
    # one image replaced by other content with its old mtime put back (as cp -p, tar, rsync -t do)
    old = os.stat(ref / "001.png")
    _folder(tmp_path / "swap", 1, seed=11)
    (tmp_path / "swap" / "000.png").replace(ref / "001.png")
    os.utime(ref / "001.png", ns=(old.st_atime_ns, old.st_mtime_ns))
    calls = extractor.calls
    fourth = fid.reference_statistics(ref, extractor, tmp_path / "cache", batch_size=4)
    assert extractor.calls > calls and fourth[2] == 7
    assert not np.allclose(fourth[0], third[0])


def test_a_broken_reference_image_is_named(tmp_path):
    ref = _folder(tmp_path / "ref", 3, seed=3)
    (ref / "001.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(UserError, match=r"cannot read .*001\.png as an image"):
        fid.reference_statistics(ref, LinearExtractor(), tmp_path / "cache", batch_size=2)
    assert not list(tmp_path.glob("cache/*"))  # no statistics cached from a partial folder


def test_reference_needs_two_images(tmp_path):
    ref = _folder(tmp_path / "ref", 1, seed=3)
    with pytest.raises(UserError, match="at least 2"):
        fid.reference_statistics(ref, LinearExtractor(), tmp_path / "cache")


def test_offline_inception_without_local_file_is_a_quick_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "CLEANFID_CACHE_DIR", tmp_path)  # an empty clean-fid cache
    monkeypatch.setattr(fid, "INCEPTION_URL", "https://inception-host.invalid/inception-2015-12-05.pt")
    started = time.perf_counter()
    with pytest.raises(UserError, match="eval.inception_weights"):
        fid.inception_path("")
    assert time.perf_counter() - started < 5
    with pytest.raises(UserError, match="no such file"):
        fid.inception_path(tmp_path / "missing.pt")


class _FakeInception(torch.nn.Module):
    """A TorchScript stand-in with the parts of clean-fid's Inception file we use: layers and output."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16))
        self.output = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.output(self.layers(x))


def test_inception_extractor_from_a_local_torchscript_file(tmp_path):
    torch.manual_seed(0)
    fake = _FakeInception()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(fake).save(str(path))
    assert fid.inception_path(path) == path
    extractor = fid.InceptionExtractor(path)
    batch = torch.rand(3, 3, 299, 299) * 255
    features = extractor(batch)
    expected = fake.layers((batch - 128) / 128)
    torch.testing.assert_close(features, expected)
    logits = extractor.logits(features.numpy())
    np.testing.assert_allclose(logits, (expected @ fake.output.weight.T).detach().numpy(), rtol=1e-5, atol=1e-6)
