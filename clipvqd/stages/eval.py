"""`clipvqd eval`: FID, IS, CLIP score and (shapes world) the judge, by protocol.

    clipvqd eval                          # generate what eval.protocol needs, then measure
    clipvqd eval samples/my-run --clip    # measure an existing samples folder
    clipvqd eval --sweep guidance=1,3 --sweep truncation=0.8,0.9

Protocols:
  shapes  both prompt sets of the shapes world, eval.samples_per_prompt each:
          judge accuracy (in-distribution and held-out; all samples and the
          CLIP-best per prompt), CLIP score, diversity, FID and IS with the tiny
          CLIP (FID against fresh renders of the generator's distribution).
  ffhq64  the paper's 64 prompts, "a photograph of " prefixed, n candidates
          each: CLIP score of the best per prompt (mean cosine). FID and IS
          too when eval.reference_path names real images.
  coco    eval.caption_count random captions of eval.captions_file, one
          sample each: FID against eval.reference_path, IS, CLIP score.

Writes eval/<name>.json (every number, protocol, counts, resolved config) and
eval/<name>.md; a sweep writes eval/<name>-sweep.json, .md and .png.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from clipvqd import checkpoint
from clipvqd.config import Config, config_to_dict
from clipvqd.data import from_uint8, open_image_file
from clipvqd.errors import UserError
from clipvqd.evaluation import judging, sweep as sweeping
from clipvqd.evaluation.protocols import prompt_text, protocol_prompts, shapes_reference
from clipvqd.metrics import clip_score_cosine, clip_score_torchmetrics, feature_statistics, frechet_distance, inception_score
from clipvqd.project import Project, plain_name, slug
from clipvqd.stages.common import configured_clip, device_of
from clipvqd.stages.rerank import read_index

IS_SPLITS = 10
IS_SHUFFLE_SEED = 0  # the fixed order in which IS splits its rows
HEADLINE = ("CLIP score (cosine, paper), best of n", "CLIP score (cosine, paper), all samples",
            "judge in-distribution, all samples: all named", "judge held-out, all samples: all named",
            "FID", "IS", "distinct images (share)")


# --------------------------------------------------------------------------- generation


def generate(config: Config, project: Project, folder: str) -> Path:
    """Sample the protocol's prompts with the project's models into samples/<folder>/ (replaced)."""
    from clipvqd.stages.sample import Generator, write_samples

    prompts, per_prompt = protocol_prompts(config, project)
    config = config.replace(**{"sample.n": per_prompt, "sample.name": folder})
    gen = Generator(config, project)
    emb = gen.clip.embed_texts(prompts, config.clip.batch_size).float()
    labels = prompts
    if len(set(prompts)) < len(prompts):  # a caption drawn twice: number the labels to keep them two prompts
        labels = [f"#{i} {p}" for i, p in enumerate(prompts)]
    out = project.samples(folder)
    if out.exists():
        shutil.rmtree(out)
    write_samples(gen, list(zip(labels, emb)), out, gen.effective_guidance())
    return out


# --------------------------------------------------------------------------- measuring


def _features_kind(config: Config) -> str:
    kind = config.eval.features
    return ("clip" if config.clip.model == "shapes" else "inception") if kind == "auto" else kind


def _extractor(config: Config, project: Project, clip, device):
    from clipvqd import fid

    if _features_kind(config) == "inception":
        return fid.InceptionExtractor(fid.inception_path(project.resolve(config.eval.inception_weights)
                                                         if config.eval.inception_weights else ""), device)
    classes = None
    if config.clip.model == "shapes" or config.eval.protocol == "shapes":
        from clipvqd.shapes.captions import describe
        from clipvqd.shapes.world import all_attributes

        classes = [describe(a.as_dict()) for a in all_attributes()]
    label = "tiny-CLIP" if config.clip.model == "shapes" else f"CLIP {clip.name}"
    return fid.ClipExtractor(clip, classes, label=label)


def _load_pixels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path} is listed in index.jsonl but missing; rerun `clipvqd sample`")
    return np.asarray(open_image_file(path), dtype=np.uint8)


def evaluate(config: Config, project: Project, samples_dir: Path, rows: list[dict]) -> tuple[dict, list[str]]:
    """All enabled metrics of one samples folder: (flat metrics, notes)."""
    from clipvqd import fid

    ec, protocol = config.eval, config.eval.protocol
    if not rows:
        raise UserError(f"{samples_dir}/index.jsonl lists no images")
    device = device_of(config)
    notes: list[str] = []
    # a prompt is its label (eval numbers repeated captions apart); its text drops that number
    prompts = [r["prompt"] for r in rows]
    text_of = [prompt_text(p) for p in prompts]
    files = [samples_dir / r["file"] for r in rows]
    shapes = protocol == "shapes"
    if shapes and config.data.source != "shapes":
        notes.append(f"eval.protocol = shapes measures the shapes world, but this project trains on "
                     f"data.source = {config.data.source}: set eval.protocol (coco, ffhq64) and eval.reference_path")
    clip = configured_clip(config, project, device)
    texts = sorted({p for p in text_of if not p.startswith("image:")})
    text_emb = dict(zip(texts, clip.embed_texts(texts, config.clip.batch_size).float().cpu())) if texts else {}

    cosines, judged, hashes = [], [], []
    for start in range(0, len(rows), ec.batch_size):
        pixels = [_load_pixels(f) for f in files[start:start + ec.batch_size]]
        part = text_of[start:start + ec.batch_size]
        if len({px.shape for px in pixels}) == 1:
            emb = clip.embed_images(from_uint8(np.stack(pixels)), config.clip.batch_size).float().cpu()
        else:  # a folder of mixed sizes: one image at a time
            emb = torch.cat([clip.embed_images(from_uint8(px[None])).float().cpu() for px in pixels])
        for p, e in zip(part, emb):
            cosines.append(float(clip_score_cosine(e, text_emb[p])) if p in text_emb else float("nan"))
        hashes += [hashlib.sha1(px.tobytes()).hexdigest() for px in pixels]
        if shapes and ec.judge:
            from clipvqd.shapes.judge import judge

            judged += [judge(px) for px in pixels]

    per_prompt = max(Counter(prompts).values())
    best = judging.best_per_prompt(prompts, [c if c == c else -2.0 for c in cosines])
    m: dict = {"images": len(rows), "prompts": len(set(prompts)), "samples per prompt": per_prompt}
    for key, label in (("model", "model (as sampled)"), ("guidance", "guidance (as sampled)"),
                       ("truncation", "truncation (as sampled)"), ("steps", "steps (as sampled)")):
        seen = {r.get(key) for r in rows}
        if len(seen) == 1 and None not in seen:
            m[label] = seen.pop()
    scored = [i for i, c in enumerate(cosines) if c == c]
    if ec.clip_score and not scored:
        notes.append("CLIP score skipped: these samples were made from reference images, not text")
    if ec.clip_score and scored:
        best_scored = [i for i in best if cosines[i] == cosines[i]]
        m["CLIP score (cosine, paper), all samples"] = float(np.mean([cosines[i] for i in scored]))
        m["CLIP score (cosine, paper), best of n"] = float(np.mean([cosines[i] for i in best_scored]))
        m["CLIP score (x100 clamped, torchmetrics), all samples"] = clip_score_torchmetrics([cosines[i] for i in scored])
        m["CLIP score (x100 clamped, torchmetrics), best of n"] = clip_score_torchmetrics([cosines[i] for i in best_scored])
        m["CLIP model"] = clip.name
    if shapes and ec.judge:
        from clipvqd.shapes.captions import parse_prompt

        named = [parse_prompt(p) for p in text_of]
        m.update(judging.judge_metrics(prompts, named, judged, [c if c == c else -2.0 for c in cosines]))
        coverage = judging.open_attribute_coverage(prompts, named, judged)
        if coverage is not None:
            m["open-attribute coverage (judged)"] = coverage
    if shapes:
        m["distinct images (share)"] = judging.distinct_share(hashes)
        m["distinct images per prompt (mean share)"] = judging.per_prompt_distinct_share(prompts, hashes)

    want_fid = ec.fid and (protocol != "ffhq64" or ec.reference_path)
    want_is = ec.inception_score and (protocol != "ffhq64" or ec.reference_path)
    if protocol == "ffhq64" and (ec.fid or ec.inception_score) and not ec.reference_path:
        notes.append("ffhq64: FID and IS skipped (set eval.reference_path to real images to add them)")
    if want_fid or want_is:
        extractor = _extractor(config, project, clip, device)
        if want_is and getattr(extractor, "class_texts", True) == []:
            notes.append("IS skipped: CLIP features have no zero-shot classes outside the shapes world")
            want_is = False
        features, logits = fid.extract(files, extractor, ec.batch_size, logits=want_is)
        fid_label = "Inception" if _features_kind(config) == "inception" else extractor.name + " features, not Inception"
        if want_fid:
            if ec.reference_path:
                reference = project.resolve(ec.reference_path)
            elif shapes:
                reference = shapes_reference(config, project)
            else:
                raise UserError(f"the {protocol} protocol's FID needs eval.reference_path: a folder of real images")
            mu, sigma, count = fid.reference_statistics(reference, extractor, project.cache, ec.batch_size)
            if len(features) < 2:
                raise UserError("FID needs at least 2 generated images")
            m["FID"] = frechet_distance(*feature_statistics(features), mu, sigma)
            m["FID features"] = f"clean-fid clean mode, {fid_label}"
            m["FID reference images"] = count
        if want_is:
            # at least 10 images a split where there are that many: one image a split scores 1 whatever it shows
            splits = max(1, min(IS_SPLITS, len(logits) // 10))
            # rows come grouped by prompt: each split must be a random sample (see inception_score)
            m["IS"], m["IS std"] = inception_score(logits, splits=splits, rng=np.random.default_rng(IS_SHUFFLE_SEED))
            m["IS kind"] = f"{extractor.is_label}, {splits} split{'s' if splits != 1 else ''}"
    return m, notes


# --------------------------------------------------------------------------- writing


def _markdown(title: str, metrics: dict, notes: list[str]) -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _compact(metrics: dict) -> dict:
    """The CLI's view: each judge block (group, selection) on one line; eval/<name>.json keeps every number."""
    out: dict = {}
    for key, value in metrics.items():
        if not key.startswith("judge "):
            out[key] = value
            continue
        block, attribute = key.rsplit(": ", 1)
        if attribute == "images":
            continue
        line = f"{attribute} {value:.3f}"
        if attribute == "all named":
            line += f" (of {metrics[block + ': images']} images)"
        out[block] = f"{out[block]}; {line}" if block in out else line
    return out


def _write_report(config: Config, project: Project, name: str, samples_dir: Path, metrics: dict, notes: list[str]) -> Path:
    path = project.eval_report(name)
    report = {"name": name, "protocol": config.eval.protocol, "samples": str(samples_dir),
              "images": metrics["images"], "metrics": metrics, "notes": notes, "config": config_to_dict(config)}
    checkpoint.atomic_write_text(path, json.dumps(report, indent=2))
    checkpoint.atomic_write_text(path.with_suffix(".md"),
                                 _markdown(f"eval {name} ({config.eval.protocol})", metrics, notes))
    return path


def _plot_metric(points: list[dict]) -> str:
    available = set().union(*(p["metrics"] for p in points))
    preferred = {"shapes": "judge in-distribution, all samples: all named", "ffhq64": "CLIP score (cosine, paper), best of n",
                 "coco": "FID"}
    order = [preferred.get(points[0]["protocol"], "")] + list(HEADLINE)
    return next((k for k in order if k in available), "images")


def run_sweep(config: Config, project: Project, sweeps: list[str], name: str | None) -> dict:
    parsed = sweeping.parse_sweeps(sweeps)
    protocol = config.eval.protocol
    name = plain_name(name or protocol, "the eval name")  # before any sampling
    points = []
    for values, point_config in sweeping.grid(config, parsed):
        folder = f"eval-{protocol}-" + slug(sweeping.label(values).replace("=", "-"), 80)
        samples_dir = generate(point_config, project, folder)
        metrics, notes = evaluate(point_config, project, samples_dir, read_index(samples_dir))
        points.append({"protocol": protocol, "values": values, "samples": str(samples_dir), "metrics": metrics, "notes": notes})
    metric = _plot_metric(points)
    out = project.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(out / f"{name}-sweep.json", json.dumps(
        {"name": name, "protocol": protocol, "grid": {k: v for k, v in parsed}, "plotted": metric,
         "points": points, "config": config_to_dict(config)}, indent=2, default=str))
    columns = [k for k in HEADLINE if any(k in p["metrics"] for p in points)]
    checkpoint.atomic_write_text(out / f"{name}-sweep.md", f"# sweep {name} ({protocol})\n\n"
                                 + sweeping.markdown_table(points, columns))
    sweeping.plot(points, metric, f"clipvqd eval sweep {name} ({protocol})").save(out / f"{name}-sweep.png")
    result: dict = {"protocol": protocol, "grid points": len(points), "plotted": metric,
                    "report": str(out / f"{name}-sweep.json")}
    for p in points:
        result[sweeping.label(p["values"])] = p["metrics"].get(metric)
    return result


def unavailable(config: Config, rows: list[dict] | None = None) -> dict[str, str]:
    """The enabled metrics this evaluation cannot compute, each with why (``rows``: a given folder's index).
    eval skips them with a note; when the user named them (``--fid`` ...), that is an error instead."""
    ec, protocol = config.eval, config.eval.protocol
    out = {}
    if protocol == "ffhq64" and not ec.reference_path:
        for flag, on in (("--fid", ec.fid), ("--is", ec.inception_score)):
            if on:
                out[flag] = "the ffhq64 protocol measures it only with eval.reference_path (real images) set"
    if ec.inception_score and _features_kind(config) == "clip" and "shapes" not in (config.clip.model, protocol):
        out["--is"] = "CLIP features have no zero-shot classes outside the shapes world"
    if ec.clip_score and rows and all(prompt_text(r["prompt"]).startswith("image:") for r in rows):
        out["--clip"] = "these samples were made from reference images, not text"
    if ec.judge and protocol != "shapes":
        out["--judge"] = "the judge reads the shapes world only (eval.protocol = shapes)"
    return out


def run(config: Config, project: Project, samples_dir: Path | None = None, sweeps: list[str] = (),
        name: str | None = None, strict: bool = False) -> dict:
    """Evaluate SAMPLES_DIR, or generate what eval.protocol needs first; with ``sweeps``, a whole grid.
    ``strict`` (the user named the metrics): a metric that cannot be computed here is an error, found
    before any sampling, not a note.

    Returns the flat dict the CLI prints; the reports go to eval/<name>.json and .md."""
    if strict:
        rows = read_index(Path(samples_dir)) if samples_dir is not None else None
        missing = unavailable(config, rows)
        if missing:
            raise UserError("cannot compute " + "; ".join(f"{flag}: {why}" for flag, why in missing.items()))
    if sweeps:
        if samples_dir is not None:
            raise UserError("--sweep samples at every grid point; it cannot evaluate a given SAMPLES_DIR")
        return run_sweep(config, project, list(sweeps), name)
    protocol = config.eval.protocol
    if name is not None:
        plain_name(name, "the eval name")  # before any sampling
    if samples_dir is not None:
        samples_dir = Path(samples_dir)
        rows = read_index(samples_dir)
        name = name or samples_dir.resolve().name  # resolved: `eval .` names the folder it is
    else:
        samples_dir = generate(config, project, f"eval-{protocol}")
        rows = read_index(samples_dir)
        name = name or protocol
    metrics, notes = evaluate(config, project, samples_dir, rows)
    report = _write_report(config, project, name, samples_dir, metrics, notes)
    result = {"protocol": protocol, "samples": str(samples_dir), **_compact(metrics), "report": str(report)}
    for i, note in enumerate(notes):
        result[f"note {i + 1}"] = note
    return result
