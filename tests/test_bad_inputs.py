"""Bad configs, bad arguments and stale artefacts through the real command line.

Every case must end the same way: exit code 2, exactly one line naming the
key or file at fault (and, for stale artefacts, the command to rerun), and no
traceback. The table runs each case on a fresh tiny project; a case's setup
writes whatever artefacts it needs (fake tokens, an untrained VQ file, a
denoiser file, a random tiny CLIP) so that no test trains anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipvqd import checkpoint
from clipvqd.clip import build_model, save_tiny_clip
from clipvqd.config import config_to_dict, load_config
from clipvqd.errors import UserError
from clipvqd.models import denoiser_config, vq_config
from clipvqd.project import Project
from clipvqd.vqgan import GumbelVQGAN
from clipvqd_cli.app import app, error_line
from tiny_project import write_fake_tokens, write_tiny_project, write_vq

runner = CliRunner()
TOKEN_DIM = 16  # embedding width of write_fake_tokens' tokens


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """The CLI binds its log handler to the first invocation's stderr, which
    CliRunner closes: drop it after each test."""
    yield
    logger = logging.getLogger("clipvqd")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


# --------------------------------------------------------------------------- artefact writers


def write_denoiser(project_file: Path, folder: str = "diffusion", vq_sha256: str | None = None,
                   cond_dim: int = TOKEN_DIM, **changes) -> Path:
    """An untrained diffusion model file carrying the metadata train-diffusion writes."""
    from clipvqd.transformer import Denoiser

    config = load_config(project_file, [f"{k}={v}" for k, v in changes.items()])
    project = Project.from_file(project_file)
    if vq_sha256 is None:
        vq_sha256 = checkpoint.file_sha256(project.vq.model) if project.vq.model.exists() else "none"
    torch.manual_seed(0)
    model = Denoiser(denoiser_config(config, (8, 8), cond_dim))
    extra = {"diffusion": config_to_dict(config.diffusion), "tokens": {"vq_sha256": vq_sha256, "clip": "fake"},
             "alpha": 0.5, "cfg_trained": False}
    path = project.root / folder / "model.safetensors"
    checkpoint.save_model(path, model.state_dict(), "diffusion", asdict(model.cfg), extra)
    return path


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory) -> Path:
    """An untrained tiny CLIP file (embedding width 24, not the tokens' 16)."""
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "random_clip.safetensors"
    save_tiny_clip(build_model(cfg), cfg, path)
    return path


def _invoke(cwd: Path, args: list[str]):
    import os

    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, args)
    finally:
        os.chdir(old)


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- the table
#
# setup(root) prepares the project folder (it holds clipvqd.toml already);
# args run in that folder; every needle must appear in the one error line.


def _no_setup(root: Path) -> None:
    pass


def _tokens(root: Path) -> None:
    write_fake_tokens(root)


def _vq(root: Path) -> None:
    write_vq(root / "clipvqd.toml")


def _vq_and_tokens_of_another_vq(root: Path) -> None:
    write_vq(root / "clipvqd.toml")
    write_fake_tokens(root, vq_sha256="0" * 64)


def _denoiser_of_another_vq(root: Path) -> None:
    write_vq(root / "clipvqd.toml")
    write_denoiser(root / "clipvqd.toml", vq_sha256="0" * 64)


def _denoiser_and_vq(root: Path) -> None:
    write_vq(root / "clipvqd.toml")
    write_denoiser(root / "clipvqd.toml")


def _vq_only(root: Path) -> None:
    write_vq(root / "clipvqd.toml")


def _bad_images(root: Path) -> None:
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("not a picture")
    (root / "empty").mkdir()


def _samples_without_index(root: Path) -> None:
    folder = root / "samples" / "loose"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "images" / "a.png")


def _vq_file_of_wrong_kind_as_diffusion(root: Path) -> None:
    vq = write_vq(root / "clipvqd.toml")
    write_fake_tokens(root, vq_sha256=checkpoint.file_sha256(vq))
    (root / "diffusion").mkdir()
    (root / "diffusion" / "model.safetensors").write_bytes((root / "vq" / "model.safetensors").read_bytes())


def _incomplete_tokens(root: Path) -> None:
    write_fake_tokens(root)
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    meta["count"] += 5
    (root / "tokens" / "meta.json").write_text(json.dumps(meta))


def _truncated_token_meta(root: Path) -> None:
    write_fake_tokens(root)
    (root / "tokens" / "meta.json").write_text('{"count": 4, "gri')


def _token_meta_without_grid(root: Path) -> None:
    write_fake_tokens(root)
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    del meta["grid"]
    (root / "tokens" / "meta.json").write_text(json.dumps(meta))


def _latin1_prompts(root: Path) -> None:
    (root / "prompts.txt").write_bytes("a caf\xe9 on a gray background\n".encode("latin-1"))


def _tokens_of_another_grid(root: Path) -> None:
    write_fake_tokens(root, grid=16)
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    meta["grid"] = [8, 8]
    (root / "tokens" / "meta.json").write_text(json.dumps(meta))


def _vq_file_with_edited_config(root: Path) -> None:
    """Weights of one VQ under the stored config of another (a hand-edited or mixed-up file)."""
    path = write_vq(root / "clipvqd.toml")
    state, meta = checkpoint.load_model(path, "vq")
    meta["config"]["base_channels"] = 16
    checkpoint.save_model(path, state, "vq", meta["config"])


CASES = {
    # -- numbers out of range
    "zero steps": (_no_setup, ["train-vq", "-s", "train_vq.steps=0"], ["train_vq.steps", ">= 1"]),
    "negative steps": (_tokens, ["train-diffusion", "-s", "train_diffusion.steps=-5"], ["train_diffusion.steps"]),
    "batch size 0": (_no_setup, ["train-vq", "-s", "train_vq.batch_size=0"], ["train_vq.batch_size"]),
    "image size not divisible": (_no_setup, ["train-vq", "-s", "data.image_size=30"],
                                 ["data.image_size = 30", "downsampling factor 4"]),
    "too few VQ levels": (_no_setup, ["train-vq", "-s", "vq.channel_mult=[1,2]"], ["vq.channel_mult"]),
    "heads do not divide width": (_tokens, ["train-diffusion", "-s", "transformer.heads=3"],
                                  ["transformer.width", "transformer.heads"]),
    "guidance below 0": (_no_setup, ["sample", "a red circle", "--guidance", "-1"], ["sample.guidance", ">= 0"]),
    "truncation 0": (_no_setup, ["sample", "a red circle", "--truncation", "0"], ["sample.truncation", "> 0"]),
    "truncation above 1": (_no_setup, ["sample", "a red circle", "--truncation", "1.5"], ["sample.truncation", "<= 1"]),
    "n = 0": (_no_setup, ["sample", "a red circle", "-n", "0"], ["command-line options: sample.n = 0"]),
    "sample steps above T": (_no_setup, ["sample", "a red circle", "--steps", "50"],
                             ["sample.steps = 50", "diffusion.timesteps = 10"]),
    "NaN guidance": (_no_setup, ["sample", "x", "-s", "sample.guidance=nan"], ["sample.guidance", "finite"]),
    "infinite learning rate": (_no_setup, ["train-vq", "-s", "train_vq.lr=inf"], ["train_vq.lr", "finite"]),
    "NaN in the project file": (lambda root: (root / "clipvqd.toml").write_text(
        (root / "clipvqd.toml").read_text().replace("[sample]\n", "[sample]\ntruncation = nan\n")),
        ["sample", "x"], ["clipvqd.toml", "sample.truncation", "finite"]),
    "negative --seed": (_no_setup, ["sample", "x", "--seed", "-3"], ["sample.seed = -3", ">= 0"]),
    "sample name with a path": (_no_setup, ["sample", "x", "--name", "../../elsewhere"], ["sample.name", "plain"]),
    "keep 0": (_no_setup, ["rerank", "samples/x", "--keep", "0"], ["rerank.keep"]),
    # -- overrides
    "unknown --set section": (_no_setup, ["train-vq", "-s", "trainvq.steps=3"], ["[trainvq]", "train_vq"]),
    "unknown --set key": (_no_setup, ["train-vq", "-s", "train_vq.stepz=3"], ["train_vq.stepz", "train_vq.steps"]),
    "non-numeric override": (_no_setup, ["train-vq", "-s", "train_vq.lr=fast"], ["train_vq.lr", "number"]),
    "non-integer override": (_no_setup, ["train-vq", "-s", "train_vq.steps=1.5"], ["train_vq.steps", "an integer"]),
    "override without =": (_no_setup, ["train-vq", "-s", "train_vq.steps"], ["section.key=value"]),
    "bad choice": (_no_setup, ["train-vq", "-s", "project.mixed_precision=fp8"], ["project.mixed_precision", "'bf16'"]),
    "bad boolean": (_no_setup, ["sample", "x", "-s", "sample.rerank=maybe"], ["sample.rerank", "true or false"]),
    "cuda without a GPU": (_no_setup, ["train-vq", "-s", "project.device=cuda"], ["project.device", "cuda"]),
    # -- files and folders
    "project path is a directory": (_no_setup, ["tokenize", "-p", "."], ["is a directory", "clipvqd.toml"]),
    "no project file": (_no_setup, ["tokenize", "-p", "nothere.toml"], ["nothere.toml", "clipvqd init"]),
    "project file not UTF-8": (lambda root: (root / "clipvqd.toml").write_bytes(b"\xff\xfe[project]\n"),
                               ["tokenize"], ["clipvqd.toml", "not valid TOML", "UTF-8"]),
    "project file with a top-level key": (lambda root: (root / "clipvqd.toml").write_text("seed = 3\n"),
                                          ["tokenize"], ["'seed' must be a [section] table"]),
    "wrong type in the project file": (lambda root: (root / "clipvqd.toml").write_text("[train_vq]\nsteps = \"ten\"\n"),
                                       ["train-vq"], ["clipvqd.toml", "train_vq.steps", "an integer"]),
    "unknown example": (_no_setup, ["init", "x", "--example", "cats"], ["cats", "shapes"]),
    "empty prompt": (_no_setup, ["sample", ""], ["prompt is empty"]),
    "blank prompt": (_no_setup, ["sample", "   "], ["prompt is empty"]),
    "nothing to sample": (_no_setup, ["sample"], ["nothing to sample"]),
    "missing --image": (_no_setup, ["sample", "--image", "nothere.png"], ["--image nothere.png", "no such file"]),
    "seed past 64 bits": (_no_setup, ["sample", "x", "--seed", str(2**64)], ["sample.seed", "out of range"]),
    "init below a file": (_no_setup, ["init", "clipvqd.toml/sub"], ["cannot write", "clipvqd.toml/sub"]),
    "missing --prompts": (_no_setup, ["sample", "--prompts", "nothere.txt"], ["--prompts nothere.txt"]),
    "folder source without a path": (_no_setup, ["train-vq", "-s", "data.source=folder"], ["data.path"]),
    "image folder missing": (_no_setup, ["train-vq", "nowhere"], ["nowhere", "not found"]),
    "empty image folder": (_bad_images, ["train-vq", "empty"], ["empty", "no readable image"]),
    "all-bad image folder": (_bad_images, ["train-vq", "bad"], ["bad"]),
    "unknown CLIP": (_vq, ["tokenize", "-s", "clip.model=ViT-Nope-99"], ["clip.model", "ViT-Nope-99"]),
    "missing CLIP file": (_vq, ["tokenize", "-s", "clip.model=shapes", "-s", "clip.pretrained=nothere.safetensors"],
                          ["nothere.safetensors"]),
    "missing perceptual weights": (_no_setup, ["train-vq", "-s", "train_vq.perceptual_weight=1"],
                                   ["perceptual_weights"]),
    # -- a stage run before its input exists
    "tokenize without vq": (_no_setup, ["tokenize"], ["vq/model.safetensors is missing", "clipvqd train-vq"]),
    "train-diffusion without tokens": (_no_setup, ["train-diffusion"], ["tokens/meta.json", "clipvqd tokenize"]),
    "finetune-cfg without diffusion": (_tokens, ["finetune-cfg"], ["diffusion/model.safetensors",
                                                                   "clipvqd train-diffusion"]),
    "sample in an empty project": (_no_setup, ["sample", "a red circle"], ["vq/model.safetensors",
                                                                           "clipvqd train-vq"]),  # the first stage
    "sample with no trained model": (_vq_only, ["sample", "a red circle"], ["diffusion/model.safetensors",
                                                                           "clipvqd train-diffusion"]),
    "sample --model cfg without it": (_vq_only, ["sample", "x", "-s", "sample.model=cfg"],
                                      ["diffusion-cfg/model.safetensors", "clipvqd finetune-cfg"]),
    "rerank without index.jsonl": (_samples_without_index, ["rerank", "samples/loose"],
                                   ["index.jsonl", "clipvqd sample"]),
    "rerank of a missing folder": (_no_setup, ["rerank", "samples/nothere"], ["samples/nothere", "clipvqd sample"]),
    # -- stale or mismatched artefacts
    "codebook differs from tokens": (_tokens, ["train-diffusion", "-s", "vq.codebook_size=64"],
                                     ["32-entry codebook", "vq.codebook_size = 64", "clipvqd tokenize"]),
    "tokens of another VQ": (_vq_and_tokens_of_another_vq, ["train-diffusion"],
                             ["tokens/", "another VQ", "clipvqd tokenize"]),
    "tokens of another image size": (_tokens_of_another_grid, ["train-diffusion"],
                                     ["tokens/codes.npy", "8x8", "clipvqd tokenize"]),
    "data.image_size changed after train-vq": (_vq, ["tokenize", "-s", "data.image_size=64"],
                                               ["32 px", "data.image_size = 64", "clipvqd train-vq"]),
    "incomplete tokens": (_incomplete_tokens, ["train-diffusion"], ["incomplete", "clipvqd tokenize"]),
    "truncated tokens/meta.json": (_truncated_token_meta, ["train-diffusion"], ["tokens/meta.json", "clipvqd tokenize"]),
    "edited tokens/meta.json": (_token_meta_without_grid, ["train-diffusion"], ["tokens/meta.json", "clipvqd tokenize"]),
    "prompts file not UTF-8": (_latin1_prompts, ["sample", "--prompts", "prompts.txt"],
                               ["--prompts prompts.txt", "not UTF-8"]),
    "diffusion model of another VQ": (_denoiser_of_another_vq, ["sample", "x"],
                                      ["another VQ", "clipvqd tokenize", "clipvqd train-diffusion"]),
    "diffusion model of another transformer": (_tokens, ["finetune-cfg", "-s", "transformer.width=64"],
                                               ["[transformer]", "clipvqd train-diffusion"]),
    "VQ file where a diffusion model belongs": (_vq_file_of_wrong_kind_as_diffusion, ["finetune-cfg"],
                                                ["diffusion model file, found vq"]),
    "VQ weights under another config": (_vq_file_with_edited_config, ["tokenize"],
                                        ["vq/model.safetensors", "do not match"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(tmp_path, name):
    setup, args, needles = CASES[name]
    root = tmp_path / "proj"
    write_tiny_project(root)
    if name == "diffusion model of another transformer":
        write_denoiser(root / "clipvqd.toml")  # width 32; the command asks for 64
    setup(root)
    assert_one_line_error(_invoke(root, args), *needles)


def test_the_table_is_big_enough():
    assert len(CASES) >= 20


# --------------------------------------------------------------------------- cases needing a CLIP


def test_clip_of_another_width_than_the_model_was_trained_with(tmp_path, random_clip):
    root = tmp_path / "proj"
    write_tiny_project(root)
    _denoiser_and_vq(root)  # trained on 16-dim embeddings; the CLIP embeds to 24
    result = _invoke(root, ["sample", "a red circle", "-s", "clip.model=shapes", "-s",
                            f"clip.pretrained={random_clip}"])
    assert_one_line_error(result, "24 dimensions", "16-dimensional", "[clip]")


def test_rerank_of_a_samples_folder_with_missing_images(tmp_path, random_clip):
    root = tmp_path / "proj"
    write_tiny_project(root)
    folder = root / "samples" / "s"
    folder.mkdir(parents=True)
    row = {"file": "images/gone.png", "prompt": "a red circle", "seed": 0, "clip_score": 0.1}
    (folder / "index.jsonl").write_text(json.dumps(row) + "\n")
    result = _invoke(root, ["rerank", "samples/s", "-s", "clip.model=shapes", "-s", f"clip.pretrained={random_clip}"])
    assert_one_line_error(result, "gone.png", "index.jsonl", "clipvqd sample")


def test_rerank_of_a_corrupt_index(tmp_path):
    root = tmp_path / "proj"
    write_tiny_project(root)
    folder = root / "samples" / "s"
    folder.mkdir(parents=True)
    (folder / "index.jsonl").write_text('{"file": "a.png"\n')
    assert_one_line_error(_invoke(root, ["rerank", "samples/s"]), "index.jsonl", "line 1", "clipvqd sample")


def _samples_folder(root: Path, rows: list[dict] | None = None, image_bytes: bytes | None = None) -> Path:
    """samples/s with one 8x8 image (or ``image_bytes`` as its file) and an index of ``rows``."""
    folder = root / "samples" / "s"
    (folder / "images").mkdir(parents=True)
    if image_bytes is None:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "images" / "a.png")
    else:
        (folder / "images" / "a.png").write_bytes(image_bytes)
    if rows is None:
        rows = [{"file": "images/a.png", "prompt": "a red circle", "seed": 0, "clip_score": 0.1}]
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("rows, needles", [
    ([], ["lists no samples"]),
    ([{"file": "images/a.png", "seed": 0, "clip_score": 0.1}], ["line 1", "not a sample record"]),
    ([{"file": "images/a.png", "prompt": "x", "clip_score": 0.1}, ["a list"]], ["line 2", "not a sample record"]),
])
def test_rerank_and_eval_of_an_edited_index(tmp_path, rows, needles):
    root = tmp_path / "proj"
    write_tiny_project(root)
    kept = root / "reranked" / "s" / "kept.txt"
    kept.parent.mkdir(parents=True)
    kept.write_text("from an earlier rerank")
    _samples_folder(root, rows)
    assert_one_line_error(_invoke(root, ["rerank", "samples/s"]), "index.jsonl", "clipvqd sample", *needles)
    assert_one_line_error(_invoke(root, ["eval", "samples/s", "--clip"]), "index.jsonl", *needles)
    assert kept.is_file()  # refused before anything was replaced


def test_rerank_and_eval_of_a_corrupt_image(tmp_path, random_clip):
    root = tmp_path / "proj"
    write_tiny_project(root)
    _samples_folder(root, image_bytes=b"\x89PNG\r\n\x1a\nnot really")
    clip = ["-s", "clip.model=shapes", "-s", f"clip.pretrained={random_clip}"]
    assert_one_line_error(_invoke(root, ["rerank", "samples/s", *clip]), "a.png", "as an image")
    assert_one_line_error(_invoke(root, ["eval", "samples/s", "--clip", *clip]),
                          "a.png", "as an image")


def test_rerank_of_dot_names_the_folder_and_spares_other_results(tmp_path, random_clip):
    root = tmp_path / "proj"
    write_tiny_project(root)
    folder = _samples_folder(root)
    other = root / "reranked" / "other" / "precious.txt"
    other.parent.mkdir(parents=True)
    other.write_text("keep me")
    result = _invoke(folder, ["rerank", ".", "-p", "../../clipvqd.toml", "-s", "clip.model=shapes",
                              "-s", f"clip.pretrained={random_clip}"])
    assert result.exit_code == 0, result.output
    assert other.read_text() == "keep me"
    assert (root / "reranked" / "s" / "images" / "a.png").is_file()


@pytest.mark.parametrize("name", ["../outside", ".", "a/b"])
def test_eval_name_must_be_a_plain_folder_name(tmp_path, name):
    root = tmp_path / "proj"
    write_tiny_project(root)
    _samples_folder(root)
    assert_one_line_error(_invoke(root, ["eval", "samples/s", "--clip", "--name", name]), "eval name", "plain folder name")
    assert not (root / "outside.json").exists() and not (root / "eval").exists()


# --------------------------------------------------------------------------- checkpoints of another configuration


def test_resuming_a_checkpoint_of_another_configuration_names_the_folder_to_delete(tmp_path):
    root = tmp_path / "proj"
    project = write_tiny_project(root, "")
    first = _invoke(root, ["train-vq", "-s", "train_vq.steps=3", "-s", "train_vq.log_every=1000"])
    assert first.exit_code == 0, first.output
    assert checkpoint.latest_checkpoint(root / "vq" / "checkpoints") is not None
    logging.getLogger("clipvqd").handlers.clear()
    result = _invoke(root, ["train-vq", "-s", "train_vq.steps=6", "-s", "vq.base_channels=16",
                            "-s", "train_vq.log_every=1000"])
    line = assert_one_line_error(result, "step-0000003.safetensors", "another configuration", "delete")
    assert str(root / "vq" / "checkpoints") in line
    assert project.exists()


def test_rerun_with_fewer_steps_than_the_checkpoint_says_how_to_go_on(tmp_path):
    root = tmp_path / "proj"
    write_tiny_project(root, "")
    first = _invoke(root, ["train-vq", "-s", "train_vq.steps=6", "-s", "train_vq.log_every=1000"])
    assert first.exit_code == 0, first.output
    logging.getLogger("clipvqd").handlers.clear()
    result = _invoke(root, ["train-vq", "-s", "train_vq.steps=4", "-s", "train_vq.log_every=1000"])
    line = assert_one_line_error(result, "step-0000006.safetensors", "at step 6", "past train_vq.steps = 4",
                                 "raise the steps")
    assert str(root / "vq" / "checkpoints") in line


# --------------------------------------------------------------------------- error lines print brackets as written


def test_brackets_in_messages_are_not_eaten_as_markup(tmp_path):
    root = tmp_path / "proj"
    write_tiny_project(root)
    (root / "[odd]").mkdir()
    result = _invoke(root, ["train-vq", "[odd]"])
    assert_one_line_error(result, "[odd]", "no readable image")
    missing = _invoke(root, ["rerank", "[/tmp]"])
    assert_one_line_error(missing, "[/tmp]")




def test_shipped_clip_against_a_model_trained_on_other_embeddings(tmp_path):
    """The default [clip] (the shipped 64-dim tiny CLIP) with a model trained on 16-dim tokens."""
    root = tmp_path / "proj"
    write_tiny_project(root)
    _denoiser_and_vq(root)
    result = _invoke(root, ["sample", "a red circle"])
    assert_one_line_error(result, "shapes:tiny_clip.safetensors", "64 dimensions", "16-dimensional", "[clip]")


def test_tokenize_remakes_a_damaged_meta_json(tmp_path):
    root = tmp_path / "proj"
    write_tiny_project(root)
    write_vq(root / "clipvqd.toml")
    write_fake_tokens(root)
    (root / "tokens" / "meta.json").write_text('{"count": 4, "gri')
    result = _invoke(root, ["tokenize"])
    assert result.exit_code == 0, result.output
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    assert meta["count"] == 64 and meta["grid"] == [8, 8]
    assert np.load(root / "tokens" / "codes.npy").shape == (64, 64)


class _VanishedFile(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise UserError("images/a.png could no longer be read as an image")


def test_a_user_error_from_a_dataloader_worker_keeps_its_own_message():
    loader = torch.utils.data.DataLoader(_VanishedFile(), num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch hands back
    assert error_line(info.value) == "images/a.png could no longer be read as an image"
    assert error_line(UserError("two\nlines")) == "two lines"


def test_train_vq_of_a_folder_records_it_so_tokenize_reads_the_same_images(tmp_path):
    root = tmp_path / "proj"
    write_tiny_project(root)  # data.source = "shapes", 64 images
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 36), (40 * i, 200 - 30 * i, 90)).save(photos / f"{i}.png")
    result = _invoke(root, ["train-vq", str(photos), "-s", "train_vq.steps=3"])
    assert result.exit_code == 0, result.output
    data = load_config(root / "clipvqd.toml").data
    assert (data.source, Path(data.path)) == ("folder", photos)
    result = _invoke(root, ["tokenize"])
    assert result.exit_code == 0, result.output
    assert json.loads((root / "tokens" / "meta.json").read_text())["count"] == 6  # the photos, not 64 shapes
