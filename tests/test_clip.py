"""clipvqd.clip: loading (and its errors), embeddings, and the shipped tiny CLIP file."""

import json
import logging
import time

import pytest
import torch
from safetensors import safe_open

from clipvqd.clip import METADATA_KEY, SHAPES_WEIGHTS, build_model, load_clip, save_tiny_clip
from clipvqd.errors import UserError
from clipvqd.shapes.train_clip import TINY_CLIP_CONFIG


@pytest.fixture(scope="module")
def clip():
    return load_clip("shapes")


def test_shipped_file_is_small_fp16_with_its_config():
    assert SHAPES_WEIGHTS.stat().st_size <= 20 * 2**20
    with safe_open(str(SHAPES_WEIGHTS), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert config["text_cfg"]["width"] == TINY_CLIP_CONFIG["text_cfg"]["width"]
    assert config["vision_cfg"]["layers"] == [1, 1, 1, 1]
    assert torch.float32 not in dtypes and torch.float16 in dtypes


def test_loaded_clip_describes_itself(clip):
    assert clip.name.startswith("shapes:tiny_clip.safetensors@") and len(clip.name.split("@")[1]) == 12
    assert clip.embed_dim == 64 and clip.context_length == 32
    assert clip.image_size % 32 == 0
    assert not clip.module.training  # BatchNorm in eval mode


def test_embeddings_are_unit_norm_batched_and_deterministic(clip):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 3, 64, 64, generator=g) * 2 - 1
    z = clip.embed_images(x)
    assert z.shape == (10, clip.embed_dim)
    assert torch.allclose(z.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(clip.embed_images(x, batch_size=3), z, atol=1e-5)  # eval mode: batch-independent
    assert clip.embed_images(x[:, :, ::2, ::2]).shape == (10, clip.embed_dim)  # any input size is resized
    texts = ["a red circle", "a small blue square at the top", "a picture of a star"]
    t = clip.embed_texts(texts)
    assert t.shape == (3, clip.embed_dim)
    assert torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(clip.embed_texts(texts, batch_size=1), t, atol=1e-5)
    assert not torch.allclose(t[0], t[1])


def test_long_prompts_warn_and_truncate(clip, caplog):
    long_prompt = "a " + "very " * 60 + "red circle"
    with caplog.at_level(logging.WARNING, logger="clipvqd"):
        z = clip.embed_texts([long_prompt, "a red circle"])
    assert "truncated" in caplog.text and z.shape == (2, clip.embed_dim)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY_CLIP_CONFIG).eval()
    path = tmp_path / "tiny.safetensors"
    save_tiny_clip(model, TINY_CLIP_CONFIG, path)
    loaded = load_clip("shapes", str(path))
    for p in model.parameters():  # the file stores fp16: compare against the fp16-rounded model
        p.data = p.data.half().float()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = model.encode_image(loaded.preprocess(x), normalize=True)
    assert torch.allclose(loaded.embed_images(x), expected, atol=1e-5)


def test_missing_local_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_clip("ViT-B-32", str(tmp_path / "nothing.safetensors"))
    with pytest.raises(UserError, match="missing"):
        load_clip("shapes", str(tmp_path / "nothing.safetensors"))


def test_unknown_model_or_tag_is_a_user_error():
    with pytest.raises(UserError, match="unknown clip.model"):
        load_clip("no-such-architecture", "weights.safetensors")
    with pytest.raises(UserError, match="neither a local file nor an open_clip tag"):
        load_clip("RN50", "no-such-tag")
    with pytest.raises(UserError, match="empty"):
        load_clip("RN50", "")


def test_weights_of_another_architecture_are_a_user_error():
    with pytest.raises(UserError, match="does not fit"):
        load_clip("RN50", str(SHAPES_WEIGHTS))


def test_tag_offline_fails_fast_with_advice(monkeypatch):
    # Never download in tests: where the network is up, the download itself is made to fail.
    def no_download(*args, **kwargs):
        raise OSError("downloads are disabled in this test")

    monkeypatch.setattr("clipvqd.clip.open_clip.create_model", no_download)
    start = time.time()
    with pytest.raises(UserError, match="clip.pretrained"):
        load_clip("ViT-B-32", "openai")
    assert time.time() - start < 15


def test_training_is_deterministic_given_the_seed():
    from clipvqd.shapes.train_clip import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the documented command does
    try:
        first = train(steps=2, seed=3, batch_size=16, log_every=0).state_dict()
        second = train(steps=2, seed=3, batch_size=16, log_every=0).state_dict()
        other = train(steps=2, seed=4, batch_size=16, log_every=0).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])


@pytest.mark.parametrize("model, tag, quick", [("ViT-B-32", "openai", True), ("ViT-B-32", "laion2b_s34b_b79k", False)])
def test_a_tag_builds_the_activation_its_weights_were_trained_with(monkeypatch, model, tag, quick):
    """open_clip's ViT-B-32 config has GELU; OpenAI's weights need QuickGELU (open_clip only warns)."""
    seen = {}

    def capture(name, **kwargs):  # stands in for the download, which then "fails"
        seen.update(kwargs)
        raise OSError("no download in tests")

    monkeypatch.setattr("clipvqd.clip._reachable", lambda host, port: True)
    monkeypatch.setattr("clipvqd.clip.open_clip.create_model", capture)
    with pytest.raises(UserError, match="no download in tests"):
        load_clip(model, tag)
    assert seen["pretrained"] == tag and seen["force_quick_gelu"] is quick


def test_a_wide_image_is_centre_cropped_not_squeezed(clip):
    """open_clip's transform resizes the short side and crops the centre; squeezing would distort."""
    g = torch.Generator().manual_seed(1)
    square = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    wide = torch.cat([torch.rand(2, 3, 32, 8, generator=g), square, torch.rand(2, 3, 32, 8, generator=g)], dim=-1)
    assert torch.equal(clip.preprocess(wide), clip.preprocess(square))
    tall = wide.transpose(-1, -2)
    assert torch.equal(clip.preprocess(tall), clip.preprocess(square.transpose(-1, -2)))
