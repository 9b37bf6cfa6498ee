"""The `clipvqd` command: thin Typer commands that load the project file, apply
overrides and sugar options, call ``clipvqd.stages.<name>.run`` and print a
summary. Errors a user can cause print one line and exit with code 2."""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from clipvqd.config import load_config
from clipvqd.errors import UserError
from clipvqd.project import Project

app = typer.Typer(
    name="clipvqd",
    help="Language-free text-to-image training (CLIP-VQDiffusion): images in, a text-conditioned generator out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

ProjectOpt = typer.Option(Path("clipvqd.toml"), "--project", "-p", help="project file (relative paths in it resolve against its folder)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config value: section.key=value (repeatable)")


def _setup_logging() -> None:
    logger = logging.getLogger("clipvqd")
    if logger.handlers:
        return
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=err, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def error_line(exc: UserError) -> str:
    """The error's message on one line, whatever it embeds (a library's multi-line text).

    A UserError raised in a DataLoader worker comes back re-raised by torch as
    "Caught UserError in DataLoader worker process N. Original Traceback ...";
    only its last line, the original message, is for the user."""
    lines = [part.strip() for part in str(exc).splitlines() if part.strip()]
    if lines and lines[0].startswith("Caught UserError in DataLoader worker"):
        return lines[-1].split("UserError: ", 1)[-1]
    return " ".join(lines)


def user_errors(fn: Callable) -> Callable:
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            # brackets such as [train_vq] or [/tmp] printed as written, not as rich markup
            err.print(f"[bold red]error:[/] {escape(error_line(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; rerun the same command to resume from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper


def _stage(name: str):
    """The stage module, or a clear non-zero exit when that stage is not built yet."""
    try:
        return importlib.import_module(f"clipvqd.stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"clipvqd.stages.{name}":
            raise
        err.print(f"`clipvqd {name.replace('_', '-')}` is not built yet in this version of clipvqd")
        raise typer.Exit(1) from None


def _load(project: Path, sets: Optional[List[str]], sugar: Optional[dict] = None):
    options = {key: str(value) for key, value in (sugar or {}).items() if value is not None}
    config = load_config(project, list(sets or []), options)
    return config, Project.from_file(project)


def _summary(title: str, result: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(str(key), str(value))
    out.print(table)


@app.command()
@user_errors
def init(
    directory: Path = typer.Argument(Path("."), help="project folder to create"),
    example: str = typer.Option("shapes", "--example", "-e", help="shapes | ffhq | coco"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing clipvqd.toml"),
):
    """Write a commented project file.  Example: clipvqd init demo --example shapes"""
    from clipvqd.templates import write_project_file

    path = write_project_file(directory, example, force=force)
    load_config(path)  # what we write must load
    out.print(escape(f"wrote {path}"), soft_wrap=True)  # one line, brackets in the path as written


@app.command("train-vq")
@user_errors
def train_vq(
    images: Optional[Path] = typer.Argument(
        None, help="image folder: sets data.source = folder and data.path, and records them in the project file"),
    project: Path = ProjectOpt,
    set: Optional[List[str]] = SetOpt,
):
    """Train the Gumbel VQ-GAN tokenizer.  Example: clipvqd train-vq images/"""
    sugar = {"data.source": "folder", "data.path": str(images.resolve())} if images else {}
    config, proj = _load(project, set, sugar)
    _summary("train-vq", _stage("train_vq").run(config, proj, record_in=project if images else None))


@app.command()
@user_errors
def tokenize(project: Path = ProjectOpt, set: Optional[List[str]] = SetOpt):
    """Encode the training images to codes and CLIP image embeddings.  Example: clipvqd tokenize"""
    config, proj = _load(project, set)
    _summary("tokenize", _stage("tokenize").run(config, proj))


@app.command("train-diffusion")
@user_errors
def train_diffusion(project: Path = ProjectOpt, set: Optional[List[str]] = SetOpt):
    """Train the VQ-Diffusion transformer on tokens/ (no captions).  Example: clipvqd train-diffusion"""
    config, proj = _load(project, set)
    _summary("train-diffusion", _stage("train_diffusion").run(config, proj))


@app.command("finetune-cfg")
@user_errors
def finetune_cfg(project: Path = ProjectOpt, set: Optional[List[str]] = SetOpt):
    """Fine-tune for classifier-free guidance (learned null condition).  Example: clipvqd finetune-cfg"""
    config, proj = _load(project, set)
    _summary("finetune-cfg", _stage("finetune_cfg").run(config, proj))


@app.command()
@user_errors
def sample(
    prompt: Optional[str] = typer.Argument(None, help="the text prompt"),
    n: Optional[int] = typer.Option(None, "-n", help="samples per prompt (sample.n)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="a file of prompts, one a line"),
    image: Optional[Path] = typer.Option(None, "--image", help="condition on this image's CLIP embedding instead"),
    steps: Optional[int] = typer.Option(None, "--steps", help="reverse steps (sample.steps)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale (sample.guidance)"),
    truncation: Optional[float] = typer.Option(None, "--truncation", help="truncation r (sample.truncation)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the first sample (sample.seed)"),
    rerank: bool = typer.Option(False, "--rerank", help="keep the best by CLIP score in reranked/"),
    keep: Optional[int] = typer.Option(None, "--keep", help="how many to keep per prompt (rerank.keep)"),
    name: Optional[str] = typer.Option(None, "--name", help="output folder under samples/"),
    project: Path = ProjectOpt,
    set: Optional[List[str]] = SetOpt,
):
    """Generate images from text.  Example: clipvqd sample "a firefighter" -n 16 --rerank"""
    sugar = {
        "sample.n": n, "sample.steps": steps, "sample.guidance": guidance, "sample.truncation": truncation,
        "sample.seed": seed, "rerank.keep": keep, "sample.name": name,
        "sample.rerank": "true" if rerank else None,
    }
    config, proj = _load(project, set, sugar)
    stage = _stage("sample")
    _summary("sample", stage.run(config, proj, prompt=prompt, prompts_file=prompts, image=image))


@app.command()
@user_errors
def rerank(
    samples_dir: Path = typer.Argument(..., help="a samples folder written by `clipvqd sample`"),
    keep: Optional[int] = typer.Option(None, "--keep", help="how many to keep per prompt (rerank.keep)"),
    project: Path = ProjectOpt,
    set: Optional[List[str]] = SetOpt,
):
    """Keep the best samples per prompt by CLIP score.  Example: clipvqd rerank samples/a-firefighter --keep 1"""
    config, proj = _load(project, set, {"rerank.keep": keep})
    _summary("rerank", _stage("rerank").run(config, proj, samples_dir=samples_dir))


@app.command("eval")
@user_errors
def eval_(
    samples_dir: Optional[Path] = typer.Argument(None, help="evaluate this samples folder instead of generating"),
    fid: bool = typer.Option(False, "--fid", help="compute FID"),
    inception: bool = typer.Option(False, "--is", help="compute Inception Score"),
    clip: bool = typer.Option(False, "--clip", help="compute CLIP score"),
    judge: bool = typer.Option(False, "--judge", help="shapes world: judge attribute accuracy"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="shapes | ffhq64 | coco (eval.protocol)"),
    sweep: Optional[List[str]] = typer.Option(None, "--sweep", help="grid over a sample key: guidance=1,1.5,3 (repeatable)"),
    name: Optional[str] = typer.Option(None, "--name", help="name of eval/<name>.json"),
    project: Path = ProjectOpt,
    set: Optional[List[str]] = SetOpt,
):
    """Measure FID, IS, CLIP score and the shapes judge.  Example: clipvqd eval --fid --is --clip"""
    sugar: dict = {"eval.protocol": protocol}
    if fid or inception or clip or judge:  # naming any metric selects exactly those
        sugar.update({"eval.fid": str(fid).lower(), "eval.inception_score": str(inception).lower(),
                      "eval.clip_score": str(clip).lower(), "eval.judge": str(judge).lower()})
    config, proj = _load(project, set, sugar)
    _summary("eval", _stage("eval").run(config, proj, samples_dir=samples_dir, sweeps=sweep or [], name=name,
                                        strict=fid or inception or clip or judge))


@app.command()
@user_errors
def demo(directory: Path = typer.Argument(Path("clipvqd-demo"), help="project folder for the demo")):
    """The whole pipeline on the built-in shapes world, sized for a laptop CPU.  Example: clipvqd demo"""
    _stage("demo").run(directory, out)


def main() -> None:
    from clipvqd.allocator import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed memory instead of faulting in fresh pages
    app()


if __name__ == "__main__":
    main()
