"""python -m streamgen.eval.train_evaluators [--out streamgen/eval/assets] [--train-clips 1500] [--epochs 12]

Trains the three evaluator nets of :mod:`streamgen.eval.evaluators` on world clips (seeds
0..N-1, half random-policy and half human-policy, 16 frames at 64x64), measures them on
held-out world seeds (800000+), and writes ``idm.safetensors``, ``encoder.safetensors``,
``theme.safetensors`` (float16) and ``evaluators.json`` (held-out accuracies, settings,
training seconds). Inputs are lightly blurred / noised during training so the evaluators
tolerate the softness of generated video. Budget: a few CPU minutes on 2 threads.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..world.episodes import generate_clip
from ..world.scene import TIMES, WEATHERS
from .metrics import action_agreement
from .evaluators import ASSETS, CLIP, InverseDynamics, ThemeClassifier, VideoEncoder, effective_targets, save, to_input


def make_data(seeds, frames: int = 16) -> dict:
    clips = [generate_clip(int(s), frames, 64, "random" if i % 2 == 0 else "human") for i, s in enumerate(seeds)]
    return {"frames": np.stack([c["frames"] for c in clips]),                  # [C, T, 64, 64, 3] uint8
            "actions": np.stack([c["actions"] for c in clips]),                # [C, T, 6]
            "pose": np.stack([c["pose"] for c in clips]),                      # [C, T, 3]
            "theme": np.array([c["look"].theme_id for c in clips]),
            "time": np.array([TIMES.index(c["look"].time) for c in clips]),
            "weather": np.array([WEATHERS.index(c["look"].weather) for c in clips])}


BLUR_MAX = 0.7          # augmentation: at most this much of a 3x3 box blur mixed in, per sample
NOISE_MAX = 0.03        # augmentation: Gaussian noise std up to this, per sample
MOTION_WEIGHT = 4.0     # encoder loss: weight of the motion regression next to the 4 classifiers
KEY_POS_WEIGHT_MAX = 10.0   # IDM: cap of the rare-key positive weight


@dataclass(frozen=True)
class Fit:
    """One evaluator's optimisation: AdamW at ``lr``; ``max_lr`` set -> a one-cycle schedule
    peaking there, else constant; ``epoch_scale`` x the --epochs passes over the data."""

    lr: float
    batch: int
    max_lr: float | None = None
    epoch_scale: int = 1
    weight_decay: float = 1e-4


FITS = MappingProxyType({"idm": Fit(lr=2e-3, batch=64, max_lr=3e-3),
                         "encoder": Fit(lr=2e-3, batch=64, max_lr=3e-3, epoch_scale=2),
                         "theme": Fit(lr=3e-3, batch=128)})


def fit(net: torch.nn.Module, n: int, loss_of: Callable[[Sequence[int]], torch.Tensor], cfg: Fit, epochs: int,
        permute: Callable[[int], Sequence[int]]) -> None:
    """The one training loop: ``epochs * cfg.epoch_scale`` passes over ``n`` samples in the order
    ``permute(n)`` draws per pass, ``loss_of(batch indices)`` per batch of ``cfg.batch``."""
    opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    passes = epochs * cfg.epoch_scale
    sched = None
    if cfg.max_lr is not None:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.max_lr, total_steps=passes * -(-n // cfg.batch))
    for _ in range(passes):
        perm = permute(n)
        for i in range(0, n, cfg.batch):
            loss = loss_of(perm[i:i + cfg.batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    net.eval()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x [B, ..., 3, 32, 32] -> randomly blurred and noised copy (per sample)."""
    shape = x.shape
    flat = x.reshape(-1, 3, 32, 32)
    blur = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, 1)
    u = torch.rand(shape[0], generator=g).view(-1, *([1] * (len(shape) - 1)))        # [B, 1, ...]
    x = x + u * BLUR_MAX * (blur.reshape(shape) - x)
    return x + torch.randn(shape, generator=g) * NOISE_MAX * torch.rand(shape[0], generator=g).view_as(u)


def _windows(data: dict):
    """Encoder samples: every 8-frame window start in {0, 4, 8} of each clip."""
    idx = [(c, s) for c in range(data["frames"].shape[0]) for s in range(0, data["frames"].shape[1] - CLIP + 1, 4)]
    return idx


def _motion(actions: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """actions [..., 8, 6], poses [..., 8, 3] -> mean effective keys of frames 1..7 (4), mean dx,
    mean |dx| -> [..., 6]"""
    keys, _ = effective_targets(poses)
    dx = actions[..., 1:, 4]
    return np.concatenate([keys.mean(-2), dx.mean(-1, keepdims=True), np.abs(dx).mean(-1, keepdims=True)], -1)


def encoder_batch(data, idx, g: torch.Generator, rng: np.random.Generator):
    """-> clips [B, 8, 3, 32, 32], targets dict."""
    clips = np.stack([data["frames"][c, s:s + CLIP] for c, s in idx])
    acts = np.stack([data["actions"][c, s:s + CLIP] for c, s in idx])
    poses = np.stack([data["pose"][c, s:s + CLIP] for c, s in idx])
    order = rng.random(len(idx)) < 0.5
    for i in np.nonzero(order)[0]:
        perm = rng.permutation(CLIP)
        while (perm == np.arange(CLIP)).all():
            perm = rng.permutation(CLIP)
        clips[i] = clips[i][perm]
    cs = np.array([c for c, _ in idx])
    tg = {"theme": data["theme"][cs], "time": data["time"][cs], "weather": data["weather"][cs],
          "order": order.astype(np.int64), "motion": _motion(acts, poses).astype(np.float32)}
    return to_input(clips), {k: torch.as_tensor(v) for k, v in tg.items()}


def encoder_loss(out: dict, tg: dict) -> torch.Tensor:
    loss = sum(F.cross_entropy(out[k], tg[k]) for k in ("theme", "time", "weather", "order"))
    return loss + MOTION_WEIGHT * F.mse_loss(out["motion"], tg["motion"])


def train(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    tr = make_data(range(args.train_clips))
    te = make_data(range(800000, 800000 + args.test_clips))
    t_data = time.perf_counter() - t0
    info = {"train_clips": args.train_clips, "test_clips": args.test_clips, "clip_frames": 16, "size": 64,
            "data_seconds": round(t_data, 1), "nets": {}}

    def pairs(d):
        x = to_input(d["frames"])                                   # [C, T, 3, 32, 32]
        keys, turn = effective_targets(d["pose"])                   # motion of frame i-1 -> i
        return x[:, :-1].reshape(-1, 3, 32, 32), x[:, 1:].reshape(-1, 3, 32, 32), \
            torch.as_tensor(keys.reshape(-1, 4)), torch.as_tensor(turn.reshape(-1))

    torch_perm = lambda n: torch.randperm(n, generator=g)          # noqa: E731
    # ---- inverse dynamics -------------------------------------------------------------------
    t1 = time.perf_counter()
    idm = InverseDynamics()
    a, b, k, t = pairs(tr)
    pos_w = ((1 - k.mean(0)) / k.mean(0).clamp_min(1e-3)).clamp(1, KEY_POS_WEIGHT_MAX)   # balance rare keys
    turn_w = (1.0 / torch.bincount(t, minlength=3).float().clamp_min(1)) * t.numel() / 3

    def idm_loss(j):
        both = augment(torch.stack([a[j], b[j]], 1), g)
        kl, tl = idm(both[:, 0], both[:, 1])
        return F.binary_cross_entropy_with_logits(kl, k[j], pos_weight=pos_w) + F.cross_entropy(tl, t[j], weight=turn_w)
    fit(idm, a.shape[0], idm_loss, FITS["idm"], args.epochs, torch_perm)
    a, b, k, t = pairs(te)
    with torch.no_grad():
        kl, tl = idm(a, b)
    key_acc = ((kl > 0).float() == k).float().mean(0)
    info["nets"]["idm"] = {"heldout_key_accuracy": {c: round(float(v), 4) for c, v in zip("WASD", key_acc)},
                           "heldout_turn_accuracy": round(float((tl.argmax(-1) == t).float().mean()), 4),
                           "heldout_agreement": {kk: round(v, 4) for kk, v in action_agreement(
                               (kl > 0).numpy(), tl.argmax(-1).numpy(), k.numpy(), t.numpy()).items()},
                           "heldout_pairs": int(a.shape[0]), "train_seconds": round(time.perf_counter() - t1, 1)}
    # ---- video encoder -----------------------------------------------------------------------
    t1 = time.perf_counter()
    enc = VideoEncoder()
    idx = _windows(tr)

    def enc_loss(js):
        x, tg = encoder_batch(tr, [idx[j] for j in js], g, rng)
        return encoder_loss(enc(augment(x, g))[1], tg)
    fit(enc, len(idx), enc_loss, FITS["encoder"], args.epochs, rng.permutation)
    x, tg = encoder_batch(te, _windows(te), g, np.random.default_rng(1))
    with torch.no_grad():
        _, out = enc(x)
    info["nets"]["encoder"] = {f"heldout_{h}_accuracy": round(float((out[h].argmax(-1) == tg[h]).float().mean()), 4)
                               for h in ("theme", "time", "weather", "order")}
    info["nets"]["encoder"]["heldout_motion_mae"] = round(float((out["motion"] - tg["motion"]).abs().mean()), 4)
    info["nets"]["encoder"]["train_seconds"] = round(time.perf_counter() - t1, 1)
    # ---- theme classifier --------------------------------------------------------------------
    t1 = time.perf_counter()
    th = ThemeClassifier()
    x = to_input(tr["frames"][:, ::2]).reshape(-1, 3, 32, 32)
    y = torch.as_tensor(np.repeat(tr["theme"], tr["frames"][:, ::2].shape[1]))
    fit(th, x.shape[0], lambda j: F.cross_entropy(th(augment(x[j], g)), y[j]), FITS["theme"], args.epochs,
        torch_perm)
    xt = to_input(te["frames"]).reshape(-1, 3, 32, 32)
    yt = torch.as_tensor(np.repeat(te["theme"], te["frames"].shape[1]))
    with torch.no_grad():
        acc = (th(xt).argmax(-1) == yt).float().mean()
    info["nets"]["theme"] = {"heldout_accuracy": round(float(acc), 4), "heldout_frames": int(xt.shape[0]),
                             "train_seconds": round(time.perf_counter() - t1, 1)}
    info["total_seconds"] = round(time.perf_counter() - t0, 1)
    info["epochs"], info["threads"] = args.epochs, args.threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, net in (("idm", idm), ("encoder", enc), ("theme", th)):
        save(net, out / f"{name}.safetensors")
        info["nets"][name]["bytes"] = (out / f"{name}.safetensors").stat().st_size
    (out / "evaluators.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamgen.eval.train_evaluators")
    p.add_argument("--out", default=str(ASSETS))
    p.add_argument("--train-clips", type=int, default=1500)
    p.add_argument("--test-clips", type=int, default=96)
    p.add_argument("--epochs", type=int, default=12, help="IDM / theme epochs (encoder: 2x)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    print(json.dumps(train(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
