"""Pure evaluation formulas: Fréchet distance, Inception Score, CLIP score.

No networks, no parameters, no I/O: callers extract features, logits or
embeddings with whatever model the protocol needs and pass the arrays here.
Inputs may be numpy arrays or torch tensors (any device or dtype); all
arithmetic is done in float64 numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _float64(x: Any) -> np.ndarray:
    """numpy or torch (any device/dtype, even bfloat16 or requiring grad) -> float64 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------
# Fréchet distance (FID when the features come from Inception's pool layer)
# ----------------------------------------------------------------------------


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), N >= 2.

    The covariance is the unbiased one (divides by N - 1), as in clean-fid and
    pytorch-fid, so statistics from either are interchangeable."""
    features = _float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    mu = features.mean(axis=0)
    sigma = np.atleast_2d(np.cov(features, rowvar=False))
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh
    (tiny negative eigenvalues from round-off are clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed stably without a general matrix square root:
    with A = S1^(1/2), S1 S2 = A (A S2) has the same eigenvalues as
    (A S2) A = A S2 A, which is symmetric positive semi-definite; so the trace
    is the sum of the square roots of A S2 A's eigenvalues. This holds for
    singular covariances too (no diagonal offset is needed) and returns a
    real number by construction."""
    mu1, mu2 = np.atleast_1d(_float64(mu1)), np.atleast_1d(_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be ({dim}, {dim}), got {sigma1.shape} and {sigma2.shape}"
        )
    sigma1 = (sigma1 + sigma1.T) / 2  # remove round-off asymmetry
    sigma2 = (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigen = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigen, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ----------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: Any = None, splits: int = 10, *,
                    probs: Any = None, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of class predictions (N, C).

    Give either ``logits`` (softmax is applied here) or ``probs=`` (rows of
    non-negative numbers summing to 1). The N rows are cut into ``splits``
    consecutive parts (part i is rows [i*N//splits, (i+1)*N//splits)); for
    each part IS = exp(mean over x of KL(p(y|x) || p(y))), where p(y) is the
    part's mean prediction. Returns the mean and the population standard
    deviation (ddof 0) of the per-part scores, the usual convention.
    IS lies in [1, C]: 1 when every prediction is the same, C when each is
    one-hot and the classes are used equally.

    Each part must be a random sample of the images: rows grouped by prompt
    would give each part only a few prompts' classes and a far too low score
    (40 prompts x 16 one-hot samples: 4.0 in prompt order, 29.8 in eval's
    order, default_rng(0)).
    Pass ``rng`` to permute the rows with it first (torch-fidelity shuffles too)."""
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits or probs=")
    if probs is None:
        scores = _float64(logits)
        if scores.ndim != 2:
            raise ValueError(f"logits must be (N, C), got shape {scores.shape}")
        log_p = _log_softmax(scores)
    else:
        p = _float64(probs)
        if p.ndim != 2:
            raise ValueError(f"probs must be (N, C), got shape {p.shape}")
        if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probs rows must be non-negative and sum to 1 (pass logits otherwise)")
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    n = log_p.shape[0]
    if rng is not None:
        log_p = log_p[rng.permutation(n)]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be between 1 and the number of rows ({n}), got {splits}")
    per_split = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part)
        # 0 * log 0 = 0: classes a row gives zero probability contribute
        # nothing (the masked entries may hold nan from -inf - -inf).
        with np.errstate(divide="ignore", invalid="ignore"):
            log_marginal = np.log(p.mean(axis=0, keepdims=True))
            terms = np.where(p > 0, p * (part - log_marginal), 0.0)
        per_split.append(np.exp(terms.sum(axis=1).mean()))
    per_split = np.asarray(per_split)
    return float(per_split.mean()), float(per_split.std())


# ----------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------


def _cosine(a: Any, b: Any) -> np.ndarray | float:
    a, b = _float64(a), _float64(b)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(f"embeddings must both be (D,) or (N, D), got {a.shape} and {b.shape}")
    norm_a = np.linalg.norm(a, axis=-1, keepdims=True)
    norm_b = np.linalg.norm(b, axis=-1, keepdims=True)
    if (norm_a == 0).any() or (norm_b == 0).any():
        raise ValueError("an embedding is the zero vector; its cosine is undefined")
    cosine = ((a / norm_a) * (b / norm_b)).sum(axis=-1)
    return float(cosine) if cosine.ndim == 0 else cosine


def clip_score_cosine(img_emb: Any, txt_emb: Any) -> np.ndarray | float:
    """CLIP score AS THE PAPER REPORTS IT: the raw cosine between the
    L2-normalised image and text embeddings, in [-1, 1] (no x100, no clamp).

    Pairs are matched row by row: (N, D) and (N, D) give N scores; (D,) and
    (D,) give one float. Inputs need not be normalised already."""
    return _cosine(img_emb, txt_emb)


def clip_score_torchmetrics(cosines: Any) -> float:
    """CLIP score AS TORCHMETRICS REPORTS IT, from the per-pair cosines
    (:func:`clip_score_cosine`): max(100 * mean cosine, 0), in [0, 100].

    torchmetrics' ``CLIPScore.compute`` clamps the mean, not each pair (its
    docstring's per-pair formula notwithstanding): cosines 0.30 and -0.20 give
    5.0, not 15.0. Not comparable with the paper's numbers (e.g. 0.330 there
    is 33.0 here)."""
    c = _float64(cosines).reshape(-1)
    if c.size == 0:
        raise ValueError("no cosines to average")
    return max(100.0 * float(c.mean()), 0.0)
