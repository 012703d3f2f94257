"""The latent-level chunk step: few-step denoise through the cache, then the context pass.

This is the exact loop of Self-Forcing's inference pipeline, written against the explicit
cache: ``cache.begin_chunk()`` once, ``len(steps)`` model calls that (over)write the chunk's
K/V (``streamgen.engine.sampling.sample``, the one sampler training also runs), one more call at
``t = context_noise`` on x0 that leaves clean K/V behind, and ``cache.end_chunk(x0)`` (the next
chunk's frame conditioning, for ``frame_cond`` models).

``draw(shape)`` returns fresh noise of that shape (a zero-argument ``draw()`` returning
noise shaped like the chunk is still accepted).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..models.model import WanDiT
from .cache import StreamCache
from .sampling import Draw, FewStepSampler, context_input, sample, shaped_draw


def chunk_step(model: WanDiT, x: torch.Tensor, t: torch.Tensor, cache: StreamCache,
               action: torch.Tensor | None = None) -> torch.Tensor:
    """One model call through the cache: the chunk x [B, k, C, H, W] at timesteps t [B, k] ->
    flow v [B, k, C, H, W], writing the chunk's K/V. Static shapes (the cache's per-chunk
    inputs are tensors updated in place), so ``streamgen.engine.compile.compile_chunk_step`` compiles
    it once for a whole session (gpt-fast's ``decode_one_token``)."""
    return model(x, t, cache=cache, action=action)


@torch.no_grad()
def generate_chunk(model: WanDiT, cache: StreamCache, sampler: FewStepSampler, noise: torch.Tensor,
                   draw: Draw | Callable[[], torch.Tensor], action: torch.Tensor | None = None,
                   step: Callable = chunk_step) -> torch.Tensor:
    """Generate one chunk of latents x0 [B, k, C, H, W] from its initial noise [B, k, C, H, W].

    ``step``: the chunk step to run (:func:`chunk_step`, or its compiled form)."""
    B, k = noise.shape[:2]
    draw = shaped_draw(draw)
    cache.begin_chunk(k)

    def flow(x, t):
        return step(model, x, torch.full((B, k), t, device=x.device, dtype=torch.float32), cache, action)

    x0 = sample(flow, noise, sampler.timesteps, draw)
    ctx = context_input(x0, sampler.cfg.context_noise, draw)
    t_ctx = torch.full((B, k), sampler.cfg.context_noise, device=x0.device, dtype=torch.float32)
    step(model, ctx, t_ctx, cache, action)
    cache.end_chunk(x0)
    return x0


@torch.no_grad()
def rollout(model: WanDiT, cache: StreamCache, sampler: FewStepSampler, noise: torch.Tensor,
            draw: Draw | Callable[[], torch.Tensor], actions: torch.Tensor | None = None,
            step: Callable = chunk_step) -> torch.Tensor:
    """Generate every chunk of ``noise`` [B, F, C, H, W] in order; returns x0 of all frames."""
    k = sampler.cfg.chunk_frames
    out = []
    for s in range(0, noise.shape[1], k):
        a = None if actions is None else actions[:, s:s + k]
        out.append(generate_chunk(model, cache, sampler, noise[:, s:s + k], draw, a, step))
    return torch.cat(out, dim=1)
