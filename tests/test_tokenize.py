"""`clipvqd tokenize` writes what the VQ and the CLIP make of each image, in order."""

from __future__ import annotations

import numpy as np
import torch

from clipvqd.config import load_config
from clipvqd.data import open_images
from clipvqd.models import load_vq
from clipvqd.project import Project
from clipvqd.stages import tokenize
from clipvqd.stages.common import configured_clip, resolved_data
from tiny_project import write_tiny_project, write_vq


def test_codes_and_embeddings_are_the_vq_and_clip_of_each_image_in_order(tmp_path):
    path = write_tiny_project(tmp_path / "proj")
    write_vq(path)
    config, project = load_config(path), Project.from_file(path)
    tokenize.run(config, project)
    codes = np.load(project.tokens / "codes.npy", allow_pickle=False)
    embeds = np.load(project.tokens / "clip.npy", allow_pickle=False)
    images = open_images(resolved_data(config, project))
    batch = torch.stack([images[i] for i in range(len(images))])
    vq, _ = load_vq(project.vq.model)
    clip = configured_clip(config, project, torch.device("cpu"))
    with torch.no_grad():
        expected_codes = vq.encode(batch).flatten(1).numpy()  # argmax codes: no noise, so exact
        expected_embeds = torch.nn.functional.normalize(clip.embed_images(batch).float(), dim=-1).numpy()
    assert codes.shape == (64, 64) and codes.dtype == np.uint16
    assert np.array_equal(codes.astype(np.int64), expected_codes)
    assert np.allclose(embeds.astype(np.float32), expected_embeds, atol=2e-3)  # stored as float16
    assert len(np.unique(codes)) > 1  # not a constant grid: the check above could tell images apart
