"""The latent-level chunk step: few-step denoise through the cache, then the context pass.

This is the exact loop of Self-Forcing's inference pipeline, written against the explicit
cache: ``cache.begin_chunk()`` once, ``len(steps)`` model calls that (over)write the chunk's
K/V, and one more call at ``t = context_noise`` on x0 that leaves clean K/V behind.
"""
from __future__ import annotations

from typing import Callable

import torch

from .cache import StreamCache
from .model import WanDiT
from .sampling import FewStepSampler


@torch.no_grad()
def generate_chunk(model: WanDiT, cache: StreamCache, sampler: FewStepSampler, noise: torch.Tensor,
                   draw: Callable[[], torch.Tensor], action: torch.Tensor | None = None) -> torch.Tensor:
    """Generate one chunk of latents x0 [B, k, C, H, W] from its initial noise."""
    B, k = noise.shape[:2]
    cache.begin_chunk(k)

    def flow(x, t):
        tt = torch.full((B, k), t, device=x.device, dtype=torch.float32)
        return model(x, tt, cache=cache, action=action)

    x0 = sampler.sample(flow, noise, draw)
    ctx = sampler.context_input(x0, draw)
    t_ctx = torch.full((B, k), sampler.cfg.context_noise, device=x0.device, dtype=torch.float32)
    model(ctx, t_ctx, cache=cache, action=action)
    return x0


@torch.no_grad()
def rollout(model: WanDiT, cache: StreamCache, sampler: FewStepSampler, noise: torch.Tensor,
            draw: Callable[[], torch.Tensor], actions: torch.Tensor | None = None) -> torch.Tensor:
    """Generate every chunk of ``noise`` [B, F, C, H, W] in order; returns x0 of all frames."""
    k = sampler.cfg.chunk_frames
    out = []
    for s in range(0, noise.shape[1], k):
        a = None if actions is None else actions[:, s:s + k]
        out.append(generate_chunk(model, cache, sampler, noise[:, s:s + k], draw, a))
    return torch.cat(out, dim=1)
