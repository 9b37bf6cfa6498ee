"""The pure metric formulas against closed forms and clean-fid's reference."""

import math

import numpy as np
import pytest
import torch

from clipvqd.metrics import (
    clip_score_cosine,
    clip_score_torchmetrics,
    feature_statistics,
    frechet_distance,
    inception_score,
)


def _random_statistics(rng, dim, n):
    features = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return feature_statistics(features)


# --- feature statistics -------------------------------------------------------


def test_feature_statistics_match_numpy_and_accept_torch():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 4))
    mu, sigma = feature_statistics(torch.tensor(features, dtype=torch.float64))
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    centered = features - features.mean(0)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-12)


def test_feature_statistics_one_dimension_is_a_matrix():
    mu, sigma = feature_statistics(np.array([[1.0], [3.0]]))
    assert mu.shape == (1,) and sigma.shape == (1, 1)
    assert sigma[0, 0] == pytest.approx(2.0)


def test_feature_statistics_needs_two_rows():
    with pytest.raises(ValueError):
        feature_statistics(np.zeros((1, 3)))


# --- Fréchet distance -----------------------------------------------------------


def test_identical_statistics_give_zero():
    mu, sigma = _random_statistics(np.random.default_rng(1), dim=8, n=100)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.0, 1.0, 0.0, 4.0), (1.5, 0.3, -2.0, 2.7), (3.0, 0.0, 1.0, 5.0)])
def test_one_dimensional_closed_form(m1, s1, m2, s2):
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * math.sqrt(s1 * s2)
    got = frechet_distance([m1], [[s1]], [m2], [[s2]])
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_diagonal_case_is_a_sum_of_one_dimensional_terms():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2 + v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_agrees_with_cleanfid_on_random_statistics():
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(3)
    for dim in (2, 16, 64):
        mu1, sigma1 = _random_statistics(rng, dim, n=4 * dim)
        mu2, sigma2 = _random_statistics(rng, dim, n=4 * dim)
        ours = frechet_distance(mu1, sigma1, mu2, sigma2)
        theirs = cleanfid_frechet(mu1, sigma1, mu2, sigma2)
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_singular_covariances_stay_finite_and_correct():
    # Rank-1 covariances along the same axis: the 1-D closed form on that axis.
    u = np.array([[1.0], [0.0], [0.0]])
    got = frechet_distance(np.zeros(3), 4 * u @ u.T, np.zeros(3), 9 * u @ u.T)
    assert got == pytest.approx(4 + 9 - 2 * 6, abs=1e-9)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# --- Inception Score ------------------------------------------------------------


def test_uniform_logits_give_one():
    mean, std = inception_score(np.zeros((100, 7)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_identical_predictions_give_one():
    rng = np.random.default_rng(4)
    logits = np.tile(rng.normal(size=(1, 5)), (40, 1))
    assert inception_score(logits, splits=4)[0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("classes", [2, 5, 10])
def test_one_hot_with_classes_used_equally_gives_class_count(classes):
    splits, per_split = 4, classes * 3
    labels = np.tile(np.arange(classes), splits * 3)
    probs = np.eye(classes)[labels]
    mean, std = inception_score(probs=probs, splits=splits)
    assert len(labels) == splits * per_split
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    # Very confident logits give (almost) the same.
    mean_logits, _ = inception_score(torch.tensor(probs * 60.0), splits=splits)
    assert mean_logits == pytest.approx(classes, rel=1e-9)


def test_inception_score_matches_a_direct_kl_computation():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(30, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (probs[:10], probs[10:20], probs[20:]):
        marginal = part.mean(0)
        kl = [sum(p[c] * math.log(p[c] / marginal[c]) for c in range(6)) for p in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    assert inception_score(probs=probs, splits=3)[0] == pytest.approx(mean, rel=1e-12)


def test_inception_score_of_rows_grouped_by_prompt_needs_the_shuffle():
    """40 prompts x 16 samples, each prompt's samples one-hot on its own class, rows in prompt order
    (as eval's folders are): each of 10 consecutive parts sees 4 prompts, IS 4; shuffled, about 30."""
    probs = np.eye(40)[np.repeat(np.arange(40), 16)]
    assert inception_score(probs=probs, splits=10) == pytest.approx((4.0, 0.0), abs=1e-9)
    order = np.random.default_rng(7).permutation(len(probs))
    shuffled = inception_score(probs=probs, splits=10, rng=np.random.default_rng(7))
    assert shuffled == inception_score(probs=probs[order], splits=10)  # exactly: the same permutation first
    assert 25 < shuffled[0] < 40
    assert inception_score(probs=probs, splits=10, rng=np.random.default_rng(0))[0] == pytest.approx(29.8185, abs=1e-4)
    assert inception_score(probs=probs, splits=1) == pytest.approx((40.0, 0.0))  # one part: order cannot matter
    assert inception_score(probs=probs, splits=10, rng=np.random.default_rng(7)) == shuffled  # same seed, same score


def test_inception_score_argument_checks():
    with pytest.raises(ValueError):
        inception_score()
    with pytest.raises(ValueError):
        inception_score(np.zeros((4, 3)), probs=np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError):
        inception_score(probs=np.ones((4, 3)))  # rows do not sum to 1
    with pytest.raises(ValueError):
        inception_score(np.zeros((4, 3)), splits=5)


# --- CLIP score -----------------------------------------------------------------


def test_clip_score_cosine_on_hand_built_vectors():
    img = np.array([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 0.0]])
    txt = np.array([[5.0, 0.0], [1.0, 0.0], [0.0, -1.0], [-2.0, 0.0]])
    expected = [1.0, 1 / math.sqrt(2), -1.0, -1.0]
    np.testing.assert_allclose(clip_score_cosine(img, txt), expected, rtol=1e-12)
    assert clip_score_cosine(np.array([0.6, 0.8]), np.array([1.0, 0.0])) == pytest.approx(0.6)


def test_clip_score_torchmetrics_clamps_the_mean_as_torchmetrics_computes():
    """torchmetrics' CLIPScore.compute: max(sum of 100 cos / n, 0); the mean is clamped, not each pair."""
    def torchmetrics_compute(cosines):  # its update/compute, written out
        score = sum(100 * c for c in cosines)
        return max(score / len(cosines), 0.0)

    for cosines in ([0.30, -0.20], [-0.05, -0.10, 0.02], [0.6], [-0.3], [0.25, 0.5, -0.9, 0.1]):
        assert clip_score_torchmetrics(cosines) == pytest.approx(torchmetrics_compute(cosines), rel=1e-12, abs=1e-12)
    assert clip_score_torchmetrics([0.30, -0.20]) == pytest.approx(5.0)  # per-pair clamping would give 15.0
    assert clip_score_torchmetrics(torch.tensor([0.5, 0.25], dtype=torch.bfloat16)) == pytest.approx(37.5)
    img = np.array([[3.0, 0.0], [1.0, 1.0]])
    txt = np.array([[5.0, 0.0], [-1.0, 0.0]])
    assert clip_score_torchmetrics(clip_score_cosine(img, txt)) == pytest.approx(100 * (1 - 1 / math.sqrt(2)) / 2)
    with pytest.raises(ValueError):
        clip_score_torchmetrics([])


def test_clip_score_rejects_zero_vectors_and_shape_mismatch():
    with pytest.raises(ValueError):
        clip_score_cosine(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError):
        clip_score_cosine(np.ones((2, 3)), np.ones((3, 3)))
