"""Continuation: does the model carry the world forward from real frames under the true actions?

Held-out world seeds, exploring-policy walks. The model opens from the walk's first true
chunk (``session(..., start=frames, start_actions=...)``), then receives the true actions and
generates ``chunks`` more chunks. Each generated chunk is compared with the true frames
(PSNR and SSIM, uint8 at the model's size) and by its sharpness (``edge_ratio``: the mean
image-gradient magnitude of the prediction over the truth's, 1 = as much edge as the world; a
blurred guess can beat copy-last on PSNR and still show no walls, and this number says so),
next to three references measured on the same walks:

  copy_last     the last opening frame repeated (what a model that ignores actions and
                motion would score);
  autoencoder   the true frames encoded and decoded by the model's own autoencoder (the
                ceiling a latent model can reach);
  shuffled      the same model with the actions of another walk (walk i gets walk i+1's
                actions), so ``model - shuffled`` is how much the model listens to keys.

Generator protocol: a ``streamgen.Pipeline`` (needs ``session(start=...)``, ``vae`` and a
temporal stride of 1).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..world.episodes import generate_clip, scene_for
from ..world.policies import run_policy
from ..world.render import World

WARMUP = 24          # policy frames walked before a walk's first frame (as in training data)


def walk(seed: int, frames: int, size: int = 64, policy: str = "explore") -> dict:
    """A held-out walk: {"frames": uint8 [T, H, W, 3], "actions": [T dicts], "caption": str}."""
    rng = np.random.default_rng([int(seed), 13])
    acts = run_policy(policy, World(seed), rng, WARMUP + frames)
    c = generate_clip(seed, WARMUP + frames, size=size, actions=acts)
    _, cap = scene_for(seed)
    return {"frames": c["frames"][WARMUP:], "actions": acts[WARMUP:], "caption": cap}


# ----------------------------------------------------------------------------- image metrics
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 arrays of one shape."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def edge_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |image gradient| of frames ``a`` over that of ``b`` (uint8 [N, H, W, 3]): 1 when
    ``a`` is as sharp as ``b``, toward 0 as it blurs (more than 1: noisier)."""
    def energy(x):
        x = x.astype(np.float32).mean(-1)                                  # [N, H, W] luma-ish
        return np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean()
    return float(energy(a) / max(energy(b), 1e-6))


def _gauss_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]                      # [1, 1, k, k]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004, 7x7 Gaussian window, sigma 1.5) of uint8 [N, H, W, 3]
    frames, per channel, valid region only."""
    x = torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3])
    y = torch.from_numpy(b.astype(np.float64)).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3])
    w = _gauss_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    f = lambda z: torch.nn.functional.conv2d(z, w)                     # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


# ----------------------------------------------------------------------------- the metric
def _model_run(gen, w: dict, actions: list, k: int, chunks: int, seed: int) -> np.ndarray:
    s = gen.session(w["caption"], seed=seed, start=w["frames"][:k], start_actions=w["actions"][:k])
    out = [s.step(actions[k * (c + 1): k * (c + 2)]) for c in range(chunks)]
    return np.concatenate(out)[: k * chunks]


@torch.no_grad()
def _autoencode(gen, frames: np.ndarray) -> np.ndarray:
    v = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[None] / 127.5 - 1.0       # [1, T, 3, H, W]
    z = gen.vae.encode(v.to(gen.device, gen.dtype))
    st = gen.vae.init_state(1)
    rec, _ = gen.vae.decode_chunk(z, st)
    return gen.to_uint8(rec[0])


def continuation(gen, walks: int = 4, chunks: int = 8, seed: int = 900000, progress=None) -> dict:
    """Run the continuation metric; returns the JSON-ready dict (per-chunk curves and means)."""
    c = gen.config
    if getattr(c, "temporal_stride", 1) != 1:
        raise ValueError("the continuation metric needs a temporal stride of 1 (one latent per video frame)")
    if walks < 2:
        raise ValueError("the continuation metric needs at least 2 walks (shuffled actions)")
    k = c.sampler.chunk_frames
    n = k * (chunks + 1)
    ws = [walk(seed + 700 + i, n, size=c.height) for i in range(walks)]
    names = ("model", "shuffled", "copy_last", "autoencoder")
    P = {m: np.zeros((walks, chunks)) for m in names}
    S = {m: np.zeros((walks, chunks)) for m in names}
    E = {m: np.zeros((walks, chunks)) for m in names}
    t0, made = time.perf_counter(), 0
    bar = progress(total=walks * 2, desc="continuation walks") if progress else None
    for i, w in enumerate(ws):
        true = w["frames"][k:]
        other = ws[(i + 1) % walks]["actions"]
        preds = {"model": _model_run(gen, w, w["actions"], k, chunks, seed + i)}
        if bar is not None:
            bar.update(1)
        preds["shuffled"] = _model_run(gen, w, w["actions"][:k] + other[k:], k, chunks, seed + i)
        if bar is not None:
            bar.update(1)
        made += 2 * k * chunks
        preds["copy_last"] = np.repeat(w["frames"][k - 1:k], k * chunks, axis=0)
        preds["autoencoder"] = _autoencode(gen, w["frames"])[k:]
        for m in names:
            for j in range(chunks):
                sl = slice(j * k, (j + 1) * k)
                P[m][i, j] = psnr(preds[m][sl], true[sl])
                S[m][i, j] = ssim(preds[m][sl], true[sl])
                E[m][i, j] = edge_ratio(preds[m][sl], true[sl])
    if bar is not None:
        bar.close()
    out = {"walks": walks, "chunks": chunks, "chunk_frames": k, "seeds": [seed + 700 + i for i in range(walks)],
           "gen_fps": made / max(time.perf_counter() - t0, 1e-9)}
    for m in names:
        out[m] = {"psnr": [float(v) for v in P[m].mean(0)], "ssim": [float(v) for v in S[m].mean(0)],
                  "edge_ratio": [float(v) for v in E[m].mean(0)],
                  "psnr_mean": float(P[m].mean()), "ssim_mean": float(S[m].mean()), "edge_ratio_mean": float(E[m].mean())}
    out["model_minus_copy_last_db"] = {"chunk1": out["model"]["psnr"][0] - out["copy_last"]["psnr"][0],
                                       "mean": out["model"]["psnr_mean"] - out["copy_last"]["psnr_mean"]}
    out["action_sensitivity_db"] = out["model"]["psnr_mean"] - out["shuffled"]["psnr_mean"]
    return out
