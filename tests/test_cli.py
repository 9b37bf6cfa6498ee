"""The command line: every command has help, user errors are one line with exit 2."""

import pytest
from typer.testing import CliRunner

from clipvqd_cli.app import app

COMMANDS = ["init", "tokenize", "train-vq", "train-diffusion", "finetune-cfg", "sample", "rerank", "eval", "demo"]
runner = CliRunner()


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_has_an_example(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert f"Example: clipvqd {name}" in " ".join(result.output.split())


def test_init_writes_a_project_that_loads(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "demo"), "--example", "shapes"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "clipvqd.toml").is_file()
    again = runner.invoke(app, ["init", str(tmp_path / "demo")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_init_says_where_it_wrote_on_one_line_as_written(tmp_path):
    """Past 80 columns (a log's width) and with brackets in the path, which rich would read as markup."""
    folder = tmp_path / ("a-project-folder-name-long-enough-to-pass-eighty-columns [seed 1]" + "x" * 20)
    result = runner.invoke(app, ["init", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {folder / 'clipvqd.toml'}\n"


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        ("[data\n", ["tokenize"], "not valid TOML"),
        ("[train_vq]\nlrr = 1\n", ["train-vq"], "train_vq.lrr"),
        ("", ["train-vq", "--set", "train_vq.batch_size=abc"], "train_vq.batch_size"),
        (None, ["train-diffusion"], "no project file"),
        ("", ["init", "x", "--example", "cats"], "unknown example 'cats'"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, setup, args, needle):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        (tmp_path / "clipvqd.toml").write_text(setup)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_project_path_that_is_a_directory(tmp_path):
    result = runner.invoke(app, ["tokenize", "--project", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output
