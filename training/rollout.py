"""Self-forcing rollout: the student generates chunk by chunk through its own KV cache.

Each chunk runs exactly the inference chunk step of ``streamgen.engine.chunk_step.generate_chunk``
(``cache.begin_chunk``, few-step denoise through the cache, a context pass at
``context_noise``), except that the denoising chain stops at ``exit_step`` (shared by every
chunk), the steps before it run under no_grad and only the exit step carries gradient. Both
run the sampler's own functions (``streamgen.engine.sampling.advance`` / ``denoise_step``). The exit
step runs against ``cache.functional_view()``, whose K/V write returns new tensors, so the
in-place writes of later no-grad passes cannot corrupt its autograd graph; the context pass
(detached) then writes the clean K/V in place, as at inference.

``context`` picks what the context pass sees: "self" (the student's own x0: Self Forcing),
"clean" (ground-truth latents: Teacher Forcing) or "noisy" (ground truth noised to a random
level per chunk: Diffusion Forcing).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..engine.cache import StreamCache
from ..engine.sampling import add_noise, advance, context_input, denoise_step

STATIC = ("write_index", "key_valid", "q_pos", "k_pos")


def _fresh_statics(cache: StreamCache):
    """Give the cache new per-chunk index tensors; the old ones stay saved in the autograd graph."""
    for name in STATIC:
        setattr(cache, name, getattr(cache, name).clone())
    if cache.last_frame is not None:          # frame_cond models: read by the graph, rewritten next
        cache.last_frame = cache.last_frame.clone()


def rollout(model, cache: StreamCache, timesteps: list[float], noise: torch.Tensor,
            draw: Callable[[tuple], torch.Tensor], exit_step: int, actions: torch.Tensor | None = None,
            context: str = "self", gt: torch.Tensor | None = None, context_t: torch.Tensor | None = None,
            context_noise: float = 0.0, grad: bool = True, start_frames: int = 0) -> torch.Tensor:
    """Roll out every chunk of ``noise`` [B, F, C, H, W]; returns x0 [B, F, C, H, W].

    timesteps: the few-step list (already warped); exit_step: index into it.
    draw(shape) -> fresh noise. cache: reset, with ``cache.cross_kv`` set (may carry grad).
    gt [B, F, ...] and context_t [B, n_chunks] are needed for context "clean"/"noisy".
    start_frames (a whole number of chunks): the first frames are ``gt``, written into the cache
    as clean context (``Session(start=...)`` at inference) and returned as they are.
    """
    B, Fr = noise.shape[:2]
    k = cache.chunk_frames
    out = []
    for ci, s in enumerate(range(0, Fr, k)):
        a = None if actions is None else actions[:, s:s + k]
        x = noise[:, s:s + k]
        cache.begin_chunk(k)
        if s < start_frames:
            with torch.no_grad():
                model(gt[:, s:s + k], torch.zeros(B, k, device=x.device), cache=cache, action=a)
                cache.end_chunk(gt[:, s:s + k])
            out.append(gt[:, s:s + k])
            continue
        tt = lambda t: torch.full((B, k), float(t), device=x.device, dtype=torch.float32)  # noqa: E731

        def flow(c):
            return lambda x_, t: model(x_, tt(t), cache=c, action=a)       # v [B, k, C, H, W]
        with torch.no_grad():
            x = advance(flow(cache), x, timesteps, draw, exit_step)
        t_exit = timesteps[exit_step]
        if grad:
            x0 = denoise_step(flow(cache.functional_view()), x, t_exit)
            _fresh_statics(cache)
        else:
            with torch.no_grad():
                x0 = denoise_step(flow(cache), x, t_exit)
        out.append(x0)
        with torch.no_grad():
            if context == "self":
                ctx, t_ctx = context_input(x0.detach(), context_noise, draw), tt(context_noise)
                done = x0.detach()
            elif context == "clean":
                ctx, t_ctx = gt[:, s:s + k], tt(0.0)
                done = ctx
            elif context == "noisy":
                t_ctx = context_t[:, ci:ci + 1].expand(B, k).float()
                sig = (t_ctx / 1000.0)[:, :, None, None, None]                  # [B, k, 1, 1, 1]
                ctx = add_noise(gt[:, s:s + k], draw(x.shape), sig).to(x.dtype)
                done = gt[:, s:s + k]
            else:
                raise ValueError(f"context must be 'self', 'clean' or 'noisy', got {context!r}")
            model(ctx, t_ctx, cache=cache, action=a)
            cache.end_chunk(done)       # the next chunk's frame conditioning (frame_cond models)
    return torch.cat(out, dim=1)


def new_cache(pcfg, batch: int, device="cpu", dtype=torch.float32) -> StreamCache:
    return StreamCache(pcfg.model, pcfg.cache, batch, pcfg.tokens_per_frame, pcfg.sampler.chunk_frames,
                       device=device, dtype=dtype, latent_hw=(pcfg.latent_height, pcfg.latent_width))
