"""`clipvqd finetune-cfg`: classifier-free guidance fine-tune. Starts from
diffusion/model.safetensors and, with probability ``drop_prob`` per sample,
replaces the condition by the learned null vector (normalised, see
ALGORITHMS.md section 3). Writes diffusion-cfg/model.safetensors."""

from __future__ import annotations

from clipvqd.config import Config
from clipvqd.project import Project
from clipvqd.stages.train_diffusion import LoopSettings, train


def run(config: Config, project: Project) -> dict:
    fc = config.finetune_cfg
    base = project.require(project.diffusion.model, "diffusion")
    settings = LoopSettings(
        "finetune-cfg", project.diffusion_cfg, fc.steps, fc.batch_size, fc.lr, fc.scale_lr, fc.warmup_steps,
        fc.log_every, fc.save_every, drop_prob=fc.drop_prob, init_from=base,
        extra_meta={"cfg_trained": True, "raw_null_at_inference": fc.raw_null_at_inference},
    )
    return train(config, project, settings)
