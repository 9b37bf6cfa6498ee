"""The language-free condition (paper Eq. 10-11) and condition dropout for
classifier-free guidance. Pure functions: no parameters, no I/O.

Training sees the pseudo text embedding
    h' = normalise(normalise(f_img(x)) + alpha * e / |e|),   e ~ N(0, I),
which sits on a cone of half-angle at most arcsin(alpha) around the image
embedding; at inference normalise(f_txt(prompt)) takes its place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_text_embedding(image_emb: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """(B, d) CLIP image embeddings -> (B, d) unit pseudo text embeddings."""
    image_emb = F.normalize(image_emb.float(), dim=-1)
    if alpha == 0:
        return image_emb
    e = torch.randn(image_emb.shape, generator=generator, device=generator.device).to(image_emb.device)
    return F.normalize(image_emb + alpha * F.normalize(e, dim=-1), dim=-1)


def drop_condition(cond: torch.Tensor, null: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each row of ``cond`` by ``null`` with probability ``p`` (keeps the graph to ``null``)."""
    if p <= 0:
        return cond
    drop = torch.rand(cond.shape[0], generator=generator, device=generator.device).to(cond.device) < p
    return torch.where(drop.unsqueeze(1), null.to(cond.dtype).expand_as(cond), cond)
