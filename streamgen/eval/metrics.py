"""Metric primitives (numpy only): Fréchet distance, action agreement, revisit similarity,
prompt-switch response. The suite (:mod:`streamgen.eval.suite`) composes them.
"""
from __future__ import annotations

import numpy as np


def gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [M, D] -> mean [D], covariance [D, D]."""
    f = np.asarray(feats, np.float64)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors for a covariance")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [M, D] and b [K, D].

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), computed with
    symmetric eigendecompositions (identical sets give exactly 0 up to rounding).
    """
    mu1, s1 = gaussian(a)
    mu2, s2 = gaussian(b)
    r = _sqrt_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    return max(fd, 0.0)


def balanced_accuracy(pred: np.ndarray, true: np.ndarray, classes) -> float:
    """Mean per-class recall over the classes present in ``true`` (nan if none)."""
    rec = [float((pred[true == c] == c).mean()) for c in classes if (true == c).any()]
    return float(np.mean(rec)) if rec else float("nan")


def action_agreement(pred_keys, pred_turn, true_keys, true_turn) -> dict:
    """Agreement of predicted and commanded actions, 0 = chance, 1 = perfect.

    Each key: balanced accuracy over pressed / not pressed, rescaled so chance (0.5) -> 0.
    Turn: balanced accuracy over left / none / right, chance (1/3) -> 0. ``score`` is the mean
    of the five (keys never both pressed and released in the commands are skipped).
    """
    out = {}
    for i, k in enumerate("WASD"):
        t, p = true_keys[:, i] > 0.5, pred_keys[:, i] > 0.5
        if t.all() or (~t).all():
            out[k] = float("nan")
            continue
        out[k] = (balanced_accuracy(p, t, (False, True)) - 0.5) / 0.5
    tb = balanced_accuracy(np.asarray(pred_turn), np.asarray(true_turn), (0, 1, 2))
    n_cls = len(set(np.asarray(true_turn).tolist()))
    chance = 1.0 / max(n_cls, 1)
    out["turn"] = (tb - chance) / (1 - chance) if n_cls > 1 else float("nan")
    vals = [v for v in out.values() if not np.isnan(v)]
    out["score"] = float(np.mean(vals)) if vals else float("nan")
    return out


def mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of uint8 images, in [0, 1]."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)


def revisit(gen: np.ndarray, gt: np.ndarray, first: int, ret: int) -> dict:
    """Revisit consistency of one returning rollout (frames [N, H, W, 3], same length).

    ``similarity`` = 1 - MAE(gen[ret], gen[first]) / baseline, clipped to [0, 1], where the
    baseline is the mean ground-truth MAE between the first-visit frame and the frames on the
    way (how different the places passed are). Ground truth scores 1. A model that returns to
    a different-looking place scores ~0. ``motion`` = the generated path's mean MAE from the
    first frame relative to ground truth's (~1; 0 for a frozen video, which trivially
    "returns").
    """
    path = range(first + 1, ret)
    base = float(np.mean([mae(gt[k], gt[first]) for k in path]))
    err = mae(gen[ret], gen[first])
    moved = float(np.mean([mae(gen[k], gen[first]) for k in path]))
    base = max(base, 1e-6)
    return {"similarity": float(np.clip(1.0 - err / base, 0.0, 1.0)), "error": err, "baseline": base,
            "motion": moved / base}


def switch_response(probs: np.ndarray, switch: int, old: int, new: int, frames: np.ndarray,
                    window: int = 8) -> dict:
    """Prompt-switch response from per-frame theme probabilities [N, C] and frames [N, H, W, 3].

    ``frames_to_switch``: first k >= 0 such that the new theme is the classifier's argmax on
    most of frames [switch+k, switch+k+window) (None if never). ``post_accuracy``: fraction
    of frames from switch+2*window on classified as the new theme; ``pre_accuracy`` the same
    for the old theme over the pre-switch frames. ``max_jump``: the largest consecutive-frame
    MAE in [switch, switch+2*window) divided by the median consecutive-frame MAE before the
    switch (1 = no more abrupt than ordinary motion).
    """
    arg = probs.argmax(-1)
    n = probs.shape[0]
    k_switch = None
    for k in range(0, n - switch - window + 1):
        if (arg[switch + k:switch + k + window] == new).mean() > 0.5:
            k_switch = k
            break
    diffs = np.array([mae(frames[i], frames[i - 1]) for i in range(1, n)])   # diffs[i-1] = |f_i - f_{i-1}|
    before = float(np.median(diffs[: max(switch - 1, 1)]))
    jump = float(diffs[switch - 1: switch - 1 + 2 * window].max())
    post = arg[switch + 2 * window:]
    return {"frames_to_switch": k_switch, "pre_accuracy": float((arg[:switch] == old).mean()),
            "post_accuracy": float((post == new).mean()) if post.size else float("nan"),
            "max_jump": jump / max(before, 1e-6)}
