"""`clipvqd sample`: text (or a reference image) -> CLIP embedding -> all-mask
token grid -> reverse diffusion -> VQ decode -> PNGs.

samples/<name>/images/<stem>-<seed>.png (the stem: the prompt's slug, at most
40 characters, with _<n> added where two prompts share one), index.jsonl (file,
prompt, seed, guidance, truncation, steps, clip_score, model) and one contact
sheet per prompt, sheet-<stem>.png. Sample i of a prompt uses seed + i and its own generator, so every
image can be reproduced alone from its recorded seed (exactly on a CPU; on a
GPU the matrix kernels chosen by batch size can change the last bits, and
rarely a near-tied draw).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from clipvqd import checkpoint
from clipvqd.config import Config
from clipvqd.contact_sheet import contact_sheet
from clipvqd.data import load_image_file, save_png
from clipvqd.diffusion import Schedule
from clipvqd.errors import UserError
from clipvqd.evaluation.protocols import read_lines
from clipvqd.models import load_denoiser, load_vq
from clipvqd.project import Project, plain_name, slug
from clipvqd.sampling import sample as reverse_diffusion
from clipvqd.stages.common import autocast, configured_clip, device_of
from clipvqd.stages.finetune_cfg import stale_base

log = logging.getLogger("clipvqd")


def choose_model(config: Config, project: Project) -> tuple[Path, str]:
    """The guidance fine-tune when present (or asked for), else the base model."""
    cfg_path, base_path = project.diffusion_cfg.model, project.diffusion.model
    if config.sample.model == "cfg":
        return project.require(cfg_path, "diffusion-cfg"), "diffusion-cfg"
    if config.sample.model == "auto" and cfg_path.exists():
        return cfg_path, "diffusion-cfg"
    return project.require(base_path, "diffusion"), "diffusion"


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    prompts: list[str] = []
    if prompt is not None:
        if not prompt.strip():
            raise UserError("the prompt is empty: give some text, for example clipvqd sample \"a red circle\"")
        prompts.append(prompt.strip())
    if prompts_file is not None:
        prompts += read_lines(prompts_file, "--prompts")
    return prompts


class Generator:
    """Everything needed to turn conditions into images, loaded once."""

    def __init__(self, config: Config, project: Project, device=None):
        self.config, self.project = config, project
        self.device = device or device_of(config)
        project.require(project.vq.model, "vq")  # the first stage: in an empty project, name it first
        self.model_path, self.model_kind = choose_model(config, project)
        self.denoiser, meta = load_denoiser(self.model_path, self.device)
        self.meta = meta
        self.vq, _ = load_vq(project.require(project.vq.model, "vq"), self.device)
        if checkpoint.file_sha256(project.vq.model) != meta["tokens"]["vq_sha256"]:
            raise UserError(f"{self.model_path} was trained on tokens of another VQ than vq/model.safetensors: "
                            "rerun `clipvqd tokenize` and `clipvqd train-diffusion`")
        if self.vq.cfg.codebook_size != self.denoiser.cfg.num_classes:
            raise UserError(f"{self.model_path} predicts {self.denoiser.cfg.num_classes} codes but the VQ has "
                            f"{self.vq.cfg.codebook_size}: rerun `clipvqd train-diffusion`")
        self.clip = configured_clip(config, project, self.device)
        if self.clip.embed_dim != self.denoiser.cfg.cond_dim:
            raise UserError(
                f"the configured CLIP ({self.clip.name}) embeds to {self.clip.embed_dim} dimensions but "
                f"{self.model_path.name} was trained on {self.denoiser.cfg.cond_dim}-dimensional embeddings of "
                f"{meta['tokens']['clip']}: set [clip] to that model"
            )
        if self.clip.name != meta["tokens"]["clip"]:
            log.warning("sampling with CLIP %s, but the model was trained on %s", self.clip.name, meta["tokens"]["clip"])
        d = meta["diffusion"]
        self.schedule = Schedule(self.denoiser.cfg.num_classes, d["timesteps"], d["keep_start"], d["keep_end"],
                                 d["mask_start"], d["mask_end"]).to(self.device)
        self.cfg_trained = bool(meta.get("cfg_trained"))
        raw = bool(meta.get("raw_null_at_inference"))
        self.null = self.denoiser.null_condition(1, normalized=not raw)[0].detach()

    def effective_guidance(self) -> float:
        g = self.config.sample.guidance
        return g if self.cfg_trained else 1.0

    @torch.no_grad()
    def images(self, cond: torch.Tensor, seeds: list[int], steps: int, guidance: float, truncation: float) -> torch.Tensor:
        """(B, d) unit conditions and one seed per row -> (B, 3, H, W) images in [-1, 1]."""
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        h, w = self.denoiser.cfg.height, self.denoiser.cfg.width
        with autocast(self.config, self.device):
            tokens = reverse_diffusion(
                self.denoiser, self.schedule, cond.to(self.device), h * w, steps=steps, guidance=guidance,
                truncation=truncation, generator=gens, null_cond=self.null,
            )
            images = self.vq.decode(tokens.view(-1, h, w)).float().clamp(-1, 1)
        return images


def run(config: Config, project: Project, prompt: str | None = None, prompts_file: Path | None = None,
        image: Path | None = None) -> dict:
    sc = config.sample
    prompts = read_prompts(prompt, prompts_file)
    if image is None and not prompts:
        raise UserError("nothing to sample: give a prompt, --prompts FILE or --image REF.png")
    if sc.name:
        plain_name(sc.name, "sample.name")
    if image is not None and not Path(image).is_file():  # before minutes of model loading
        raise UserError(f"--image {image}: {'a folder, not an image file' if Path(image).is_dir() else 'no such file'}")
    gen = Generator(config, project)
    guidance = gen.effective_guidance()
    notes = []
    if gen.model_kind == "diffusion-cfg" and stale_base(project):
        notes.append("diffusion-cfg was fine-tuned from an earlier diffusion/model.safetensors (train-diffusion "
                     "ran since): delete diffusion-cfg/ and rerun `clipvqd finetune-cfg` to guide the new one")
    if gen.model_kind == "diffusion":
        notes.append("base model (no guidance fine-tune found; run `clipvqd finetune-cfg` for guidance)")
        if sc.guidance != 1.0:
            notes.append(f"guidance {sc.guidance} ignored: the base model has no trained null condition")
    jobs: list[tuple[str, torch.Tensor]] = []  # (prompt label, unit condition)
    if prompts:
        text_emb = gen.clip.embed_texts(prompts, config.clip.batch_size).float()
        jobs += list(zip(prompts, text_emb))
    if image is not None:
        ref = load_image_file(image, config.data.image_size).unsqueeze(0)
        jobs.append((f"image:{Path(image).name}", gen.clip.embed_images(ref).float()[0]))

    name = sc.name or (slug(jobs[0][0]) if len(jobs) == 1 else (Path(prompts_file).stem if prompts_file else "batch"))
    out = project.samples(name)
    if out.exists():  # a new run replaces the folder: no images of an earlier run stay beside its index
        shutil.rmtree(out)
    rows, sheets = write_samples(gen, jobs, out, guidance)
    result = {"samples": str(out), "images": len(rows), "model": gen.model_kind,
              "guidance": guidance, "truncation": sc.truncation, "steps": sc.steps,
              "mean CLIP score (cosine)": sum(r["clip_score"] for r in rows) / len(rows),
              "contact sheets": len(sheets)}
    for i, note in enumerate(notes):
        result[f"note {i + 1}"] = note
    if sc.rerank:
        from clipvqd.stages.rerank import keep_best

        result["reranked"] = str(keep_best(project, out, rows, config.rerank.keep))
    return result


def file_stems(labels: list[str]) -> list[str]:
    """One file-name stem per job: the label's slug, with the job's number added where two jobs
    share a slug (two prompts alike in their first 40 characters, or one prompt given twice),
    so that no job's images overwrite another's. A slug has no '_', so 'slug_j' is unique."""
    stems = [slug(label, 40) for label in labels]
    shared = {s for s, n in Counter(stems).items() if n > 1}
    return [f"{s}_{j}" if s in shared else s for j, s in enumerate(stems)]


def write_samples(gen: Generator, jobs: list[tuple[str, torch.Tensor]], out: Path, guidance: float):
    """Sample ``n`` images per job, write PNGs, index.jsonl and contact sheets; return (rows, sheet paths)."""
    sc = gen.config.sample
    stems = file_stems([label for label, _ in jobs])
    flat = [(j, label, cond, sc.seed + i) for j, (label, cond) in enumerate(jobs) for i in range(sc.n)]
    rows, by_prompt = [], {}
    started = time.perf_counter()
    for b in range(0, len(flat), sc.batch_size):
        chunk = flat[b:b + sc.batch_size]
        cond = torch.stack([c for _, _, c, _ in chunk]).to(gen.device)
        images = gen.images(cond, [s for _, _, _, s in chunk], sc.steps, guidance, sc.truncation)
        scores = (gen.clip.embed_images(images).float() * F.normalize(cond.float(), dim=-1)).sum(-1)
        for (j, label, _, seed), img, score in zip(chunk, images.cpu(), scores.tolist()):
            file = f"images/{stems[j]}-{seed:06d}.png"
            save_png(img, out / file)
            rows.append({"file": file, "prompt": label, "seed": seed, "guidance": guidance,
                         "truncation": sc.truncation, "steps": sc.steps, "clip_score": round(score, 6),
                         "model": gen.model_kind})
            by_prompt.setdefault((stems[j], label), []).append(img)
    elapsed = time.perf_counter() - started
    sheets = []
    for (stem, label), imgs in by_prompt.items():
        path = out / f"sheet-{stem}.png"
        contact_sheet([(label, torch.stack(imgs))], per_row=8).save(path)
        sheets.append(path)
    checkpoint.atomic_write_text(out / "index.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    log.info("sampled %d images in %.1f s (%.2f images/s)", len(rows), elapsed, len(rows) / max(elapsed, 1e-9))
    return rows, sheets
