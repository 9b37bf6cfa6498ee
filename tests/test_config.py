"""The project file: defaults, overrides, errors that name the key, shipped examples."""

from pathlib import Path

import pytest

from clipvqd.config import Config, config_from_dict, config_to_dict, load_config
from clipvqd.errors import UserError
from clipvqd.templates import EXAMPLES, render_project_file, write_project_file

REPO = Path(__file__).resolve().parents[1]


def test_defaults_load_and_round_trip():
    config = load_config(None)
    assert config == Config()
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_every_shipped_example_loads_and_matches_init(example, tmp_path):
    shipped = REPO / "examples" / example / "clipvqd.toml"
    assert shipped.read_text() == render_project_file(example), "regenerate examples/ with clipvqd init"
    config = load_config(shipped)
    path = write_project_file(tmp_path / example, example)
    assert load_config(path) == config


def test_paper_examples_carry_paper_hyperparameters():
    ffhq = load_config(REPO / "examples/ffhq/clipvqd.toml")
    assert (ffhq.vq.codebook_size, ffhq.vq.embed_dim, ffhq.vq.downsample) == (4096, 256, 16)
    assert ffhq.vq.channel_mult == (1, 1, 2, 2, 4) and ffhq.vq.attn_resolutions == (16,)
    assert (ffhq.transformer.layers, ffhq.transformer.width, ffhq.transformer.heads) == (24, 512, 16)
    assert (ffhq.sample.guidance, ffhq.sample.truncation, ffhq.train_diffusion.alpha) == (1.15, 0.85, 0.5)
    assert ffhq.train_vq.disc_start == 25000 and ffhq.train_vq.lr == 4.5e-6 and ffhq.train_vq.scale_lr
    coco = load_config(REPO / "examples/coco/clipvqd.toml")
    assert (coco.sample.guidance, coco.sample.truncation, coco.train_diffusion.alpha) == (3.0, 0.9, 0.25)
    assert coco.eval.protocol == "coco" and coco.diffusion.aux_weight == 5e-4


def test_precedence_file_then_overrides(tmp_path):
    path = tmp_path / "clipvqd.toml"
    path.write_text("[train_vq]\nbatch_size = 8\nsteps = 10\n[vq]\nchannel_mult = [1, 2, 2]\n")
    config = load_config(path, ["train_vq.batch_size=4", "sample.rerank=yes", "vq.attn_resolutions=[8, 16]"])
    assert config.train_vq.batch_size == 4 and config.train_vq.steps == 10
    assert config.vq.channel_mult == (1, 2, 2) and config.vq.downsample == 4
    assert config.sample.rerank is True and config.vq.attn_resolutions == (8, 16)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("[train_vq]\nlrr = 1.0\n", [], "train_vq.lrr (did you mean train_vq.lr?)"),
        ("[trian_vq]\nlr = 1.0\n", [], "unknown section [trian_vq] (did you mean train_vq?)"),
        ("[train_vq]\nbatch_size = 'abc'\n", [], "train_vq.batch_size = 'abc' is not valid: expected an integer"),
        ("", ["train_vq.batch_size=abc"], "--set: train_vq.batch_size = 'abc' is not valid"),
        ("", ["train_vq.batch_size=0"], "train_vq.batch_size = 0 is out of range: expected >= 1"),
        ("", ["sample.truncation=1.5"], "sample.truncation = 1.5 is out of range"),
        ("", ["sample.guidance=-1"], "sample.guidance = -1.0 is out of range"),
        ("", ["project.mixed_precision=fp8"], "expected one of 'no', 'bf16', 'fp16'"),
        ("", ["data.image_size=66"], "data.image_size = 66 is not divisible by the VQ downsampling factor 4"),
        ("", ["transformer.heads=5"], "transformer.width = 128 is not divisible by transformer.heads = 5"),
        ("", ["sample.steps=101"], "sample.steps = 101 exceeds diffusion.timesteps = 100"),
        ("", ["vq.channel_mult=1,2"], "vq.channel_mult = [1, 2] gives downsampling factor 2"),
        ("", ["train_vq"], "expected section.key=value"),
        ("[diffusion]\nkeep_start = 0.9\nmask_start = 0.1\nkeep_end = 0.0001\nmask_end = 0.9999\n", [],
         "[diffusion] diffusion schedule has (almost) no uniform replacement"),
        ("data = 3\n", [], "'data' must be a [section] table"),
        ("[data\n", [], "not valid TOML"),
    ],
)
def test_errors_name_the_problem(tmp_path, text, overrides, message):
    path = tmp_path / "clipvqd.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_command_options_come_last_and_are_named_in_errors(tmp_path):
    path = tmp_path / "clipvqd.toml"
    path.write_text("[sample]\nsteps = 100\n")
    config = load_config(path, ["sample.steps=20"], {"sample.steps": "30"})
    assert config.sample.steps == 30
    with pytest.raises(UserError) as info:
        load_config(path, ["sample.steps=20"], {"sample.steps": "0"})
    assert str(info.value) == "command-line options: sample.steps = 0 is out of range: expected >= 1"
    # checked together: a --set that is valid only with the option's value passes
    config = load_config(path, ["diffusion.timesteps=50"], {"sample.steps": "25"})
    assert (config.diffusion.timesteps, config.sample.steps) == (50, 25)
    with pytest.raises(UserError, match="--set and command-line options: sample.steps = 60 exceeds"):
        load_config(path, ["diffusion.timesteps=50"], {"sample.steps": "60"})


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="no project file at .*clipvqd init"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)


def test_unknown_example(tmp_path):
    with pytest.raises(UserError, match="unknown example 'cats'"):
        write_project_file(tmp_path, "cats")


# --------------------------------------------------------------------------- train-vq DIR records DIR


@pytest.mark.parametrize("example", ["shapes", "ffhq", "coco"])
def test_record_image_folder_changes_only_the_data_lines_and_a_reference_that_named_them(tmp_path, example):
    """ffhq's FID reference is its training folder, so it follows; coco's (val2014) and shapes' (none) stay."""
    from clipvqd.templates import record_image_folder, write_project_file

    path = write_project_file(tmp_path / "p", example)
    before, old = path.read_text().splitlines(), config_to_dict(load_config(path))
    follows = example == "ffhq"
    assert record_image_folder(path, tmp_path / "p" / "images") == ("images", follows)
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b] + [(None, b) for b in after[len(before):]]
    allowed = {'source = "folder"', 'path = "images"'} | ({'reference_path = "images"'} if follows else set())
    assert {b for _, b in changed} <= allowed and len(after) - len(before) <= 2
    config = load_config(path)
    assert (config.data.source, config.data.path) == ("folder", "images")
    old["data"].update(source="folder", path="images")
    if follows:
        old["eval"].update(reference_path="images")
    assert config_to_dict(config) == old  # nothing else moved
    text = path.read_text()
    assert record_image_folder(path, tmp_path / "p" / "images" / ".") is None  # already so: untouched
    assert path.read_text() == text
    elsewhere = tmp_path / "photos ü"
    assert record_image_folder(path, elsewhere) == (str(elsewhere), follows)  # outside the project: absolute
    assert load_config(path).data.path == str(elsewhere)
    assert (load_config(path).eval.reference_path == str(elsewhere)) == follows


def test_record_image_folder_adds_a_data_table_and_refuses_forms_it_cannot_edit(tmp_path):
    from clipvqd.templates import record_image_folder

    path = tmp_path / "clipvqd.toml"
    path.write_text("[sample]\nn = 4")  # no [data], no final newline
    record_image_folder(path, tmp_path / "imgs")
    assert load_config(path).data.path == "imgs" and load_config(path).sample.n == 4
    dotted = 'data.source = "shapes"\n'
    path.write_text(dotted)
    with pytest.raises(UserError, match='path = "imgs" under \\[data\\] yourself'):
        record_image_folder(path, tmp_path / "imgs")
    assert path.read_text() == dotted
