"""Training data: world clips (rendered once) -> latents + text embeddings (encoded once).

Everything is cached under ``data.cache_dir`` so the teacher and students never re-run the
world renderer or the encoder. Batches are drawn by step index (``batch_indices``), so the
data position of a resumed run is just its step.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from .config import DataConfig


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _atomic_save(obj, path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _wu(cfg: DataConfig) -> tuple:
    """Cache-key parts of options added later (empty at their defaults: old caches stay valid)."""
    return (cfg.warmup,) if cfg.warmup else ()


def load_frames(cfg: DataConfig) -> dict:
    """{"frames": uint8 [N, T, H, W, 3], "actions": f32 [N, T, 6], "captions": [str]} (cached)."""
    os.makedirs(cfg.cache_dir, exist_ok=True)
    path = os.path.join(cfg.cache_dir, f"frames-{_key(cfg.source, cfg.clips, cfg.clip_frames, cfg.size, cfg.seed, cfg.policy, cfg.folder, *_wu(cfg))}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    frames, actions, captions = [], [], []
    if cfg.source == "world":
        from ..world.episodes import generate_clip
        for i in range(cfg.clips):
            c = generate_clip(cfg.seed * 1_000_003 + i, cfg.clip_frames, size=cfg.size, policy=cfg.policy,
                              warmup=cfg.warmup)
            frames.append(torch.from_numpy(np.ascontiguousarray(c["frames"])))
            actions.append(torch.from_numpy(c["actions"]))
            captions.append(c["caption"])
    else:
        from ..world.data import VideoFolderDataset          # the world engineer's folder reader
        ds = VideoFolderDataset(cfg.folder, cfg.captions, clip_frames=cfg.clip_frames, size=cfg.size)
        for i, c in enumerate(ds):
            if i >= cfg.clips:
                break
            frames.append(torch.as_tensor(np.ascontiguousarray(c["frames"])))
            act = c.get("actions")
            actions.append(torch.zeros(cfg.clip_frames, 6) if act is None else torch.as_tensor(act).float())
            captions.append(c.get("caption", ""))
    out = {"frames": torch.stack(frames), "actions": torch.stack(actions), "captions": captions}
    _atomic_save(out, path)
    return out


def to_video(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, T, 3, H, W] in [-1, 1]."""
    return frames_u8.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


def build_text_encoder_for(pcfg):
    from ..codecs.factory import build_text_encoder
    return build_text_encoder(pcfg.text_encoder, pcfg.model.text_dim, pcfg.model.text_len)


@torch.no_grad()
def load_latents(cfg: DataConfig, pcfg, autoencoder, ae_path: str) -> dict:
    """{"latents": [N, F, C, h, w], "actions": [N, F, A], "text": [N, L, D], "captions"} (cached)."""
    stamp = os.path.getmtime(ae_path) if ae_path and os.path.exists(ae_path) else 0
    path = os.path.join(cfg.cache_dir, "latents-" + _key(cfg.source, cfg.clips, cfg.clip_frames, cfg.size, cfg.seed,
                                                          cfg.policy, cfg.folder, *_wu(cfg), ae_path, stamp,
                                                          pcfg.text_encoder,
                                                          pcfg.model.text_dim) + ".pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    raw = load_frames(cfg)
    from tqdm import tqdm
    lat = []
    for i in tqdm(range(0, raw["frames"].shape[0], 32), desc="encoding clips", unit="batch", mininterval=5.0):
        lat.append(autoencoder.encode(to_video(raw["frames"][i:i + 32])).float())
    enc = build_text_encoder_for(pcfg)
    memo = {}
    text = []
    for cap in raw["captions"]:
        if cap not in memo:
            memo[cap] = enc(cap or " ")[0] if cap else torch.zeros(pcfg.model.text_len, pcfg.model.text_dim)
        text.append(memo[cap])
    out = {"latents": torch.cat(lat), "actions": raw["actions"].float(), "text": torch.stack(text).float(),
           "captions": raw["captions"]}
    _atomic_save(out, path)
    return out


def batch_indices(n: int, batch: int, step: int, seed: int, rank: int = 0) -> torch.Tensor:
    """The clips of ``step`` on ``rank``: deterministic, so resuming at a step resumes the data."""
    g = torch.Generator().manual_seed(step_seed(seed, step, rank, salt=1))
    return torch.randint(0, n, (batch,), generator=g)


def step_seed(seed: int, step: int, rank: int = 0, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + salt * 15_485_863) % (2 ** 63 - 1)
