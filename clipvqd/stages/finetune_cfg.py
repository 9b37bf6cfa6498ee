"""`clipvqd finetune-cfg`: classifier-free guidance fine-tune. Starts from
diffusion/model.safetensors and, with probability ``drop_prob`` per sample,
replaces the condition by the learned null vector, L2-normalised like a CLIP
embedding (our choice: the released code used the raw vector at inference;
finetune_cfg.raw_null_at_inference keeps that). Writes diffusion-cfg/model.safetensors, which
records the sha256 of the base model it started from."""

from __future__ import annotations

from clipvqd import checkpoint
from clipvqd.config import Config
from clipvqd.errors import UserError
from clipvqd.project import Project
from clipvqd.stages.train_diffusion import LoopSettings, train


def run(config: Config, project: Project) -> dict:
    fc = config.finetune_cfg
    base = project.require(project.diffusion.model, "diffusion")
    base_sha256 = checkpoint.file_sha256(base)
    tuned = project.diffusion_cfg.model
    if tuned.exists() and stale_base(project, base_sha256):  # neither kept as finished nor trained further
        raise UserError(f"{tuned} was fine-tuned from another diffusion/model.safetensors than the one there now "
                        f"(train-diffusion ran since): delete {tuned.parent} to fine-tune the new one")
    settings = LoopSettings(
        "finetune-cfg", project.diffusion_cfg, fc.steps, fc.batch_size, fc.lr, fc.scale_lr, fc.warmup_steps,
        fc.log_every, fc.save_every, drop_prob=fc.drop_prob, init_from=base,
        extra_meta={"cfg_trained": True, "raw_null_at_inference": fc.raw_null_at_inference,
                    "base_sha256": base_sha256},  # which base it guides: see stale_base
    )
    return train(config, project, settings)


def stale_base(project: Project, base_sha256: str | None = None) -> bool:
    """Whether diffusion-cfg/ was fine-tuned from another diffusion/model.safetensors than the one
    there now (train-diffusion ran since; ``base_sha256``: that file's, when already known). Files
    from before this record was kept count as current."""
    recorded = checkpoint.read_metadata(project.diffusion_cfg.model).get("base_sha256")
    base = project.diffusion.model
    if recorded is None or not base.is_file():
        return False
    return recorded != (base_sha256 or checkpoint.file_sha256(base))
