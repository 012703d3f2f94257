"""Flow-matching schedule and the few-step chunk sampler, separate from the model.

The sampler is a set of free functions with one signature (``flow, x, timesteps, draw``):
:func:`sample` (the whole loop), :func:`advance` (its first steps), :func:`denoise_step`
(one x0 prediction) and :func:`context_input`; inference and training both run them, and
noise is always drawn as ``draw(shape)``.

Conventions (Wan / Self-Forcing): x_t = (1 - sigma) x0 + sigma * eps, t = 1000 * sigma, the
model predicts the flow v = eps - x0, so x0 = x_t - sigma * v.

The "table" is Self-Forcing's 1000-entry shifted schedule: sigma_k = s(1 - k/1000) with
s(u) = shift*u / (1 + (shift-1)*u). "Warped" step lists index it: t_i = table[1000 - step_i].
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..config import SamplerConfig


def shift_sigma(sigma, shift: float):
    """sigma' = shift*sigma / (1 + (shift-1)*sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowSchedule:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.shift, self.n = shift, num_train_timesteps
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]                 # fp32, as SF
        self.sigmas = shift_sigma(base, shift)                                          # [1000]
        self.timesteps = self.sigmas * num_train_timesteps                              # [1000]

    def warp(self, steps) -> list[float]:
        """Map raw steps (1000, 750, ...) through the shifted table (Self-Forcing's warp)."""
        table = torch.cat([self.timesteps, torch.zeros(1)])
        idx = torch.tensor([self.n - int(s) for s in steps], dtype=torch.long)
        return [float(v) for v in table[idx]]


Flow = Callable[[torch.Tensor, float], torch.Tensor]      # flow(x, t) -> v, same shape as x
Draw = Callable[[tuple], torch.Tensor]                    # draw(shape) -> fresh noise of that shape


# ------------------------------------------------------------------ the sampler (free functions)
# One signature, k-diffusion's habit: (flow, x, timesteps, draw). Inference (streamgen.engine.chunk_step)
# and training (streamgen.training.rollout) both run these; noise is always ``draw(shape)``.
def denoise_step(flow: Flow, x: torch.Tensor, t: float) -> torch.Tensor:
    """x0 predicted from x [B, k, C, H, W] at timestep t: x - (t/1000) * flow(x, t)."""
    return to_x0(x, flow(x, t), t / 1000.0)


def advance(flow: Flow, x: torch.Tensor, timesteps, draw: Draw, steps: int) -> torch.Tensor:
    """Run the first ``steps`` steps of the chain: denoise at t_i, re-noise with fresh noise to
    t_{i+1}. Returns x at ``timesteps[steps]`` (x itself for steps=0)."""
    for i in range(steps):
        x = add_noise(denoise_step(flow, x, timesteps[i]), draw(x.shape), timesteps[i + 1] / 1000.0)
    return x


def sample(flow: Flow, x: torch.Tensor, timesteps, draw: Draw) -> torch.Tensor:
    """The few-step loop on one chunk x [B, k, C, H, W] (initial noise): ``len(timesteps)``
    flow calls with fresh noise in between. Returns x0 in the dtype of the flow's output."""
    last = len(timesteps) - 1
    return denoise_step(flow, advance(flow, x, timesteps, draw, last), timesteps[last])


def context_input(x0: torch.Tensor, context_noise: float, draw: Draw) -> torch.Tensor:
    """What the clean-context K/V pass sees: x0, re-noised to ``context_noise`` if > 0."""
    if context_noise == 0:
        return x0
    return add_noise(x0, draw(x0.shape), context_noise / 1000.0)


def shaped_draw(draw) -> Draw:
    """``draw(shape)`` from a draw of either convention: a zero-argument ``draw()`` (callers
    written before the one convention; it must return noise shaped like the chunk) is wrapped."""
    try:
        params = inspect.signature(draw).parameters.values()
    except (TypeError, ValueError):
        return draw
    takes_one = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    return draw if takes_one else (lambda shape: draw())


class FewStepSampler:
    """The few-step schedule of a :class:`SamplerConfig` (timesteps, sigmas) and its loop."""

    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        self.schedule = FlowSchedule(cfg.shift)
        steps = [float(s) for s in cfg.denoising_steps]
        self.timesteps = self.schedule.warp(steps) if cfg.warp else steps
        self.sigmas = [t / 1000.0 for t in self.timesteps]
        self.context_sigma = cfg.context_noise / 1000.0

    def sample(self, flow: Flow, noise: torch.Tensor, draw) -> torch.Tensor:
        """:func:`sample` with this schedule; noise: initial x [B, k, C, H, W]; draw(shape)."""
        return sample(flow, noise, self.timesteps, shaped_draw(draw))

    def context_input(self, x0: torch.Tensor, draw) -> torch.Tensor:
        """:func:`context_input` at this config's ``context_noise``."""
        return context_input(x0, self.cfg.context_noise, shaped_draw(draw))


def to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma, compute_dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """x0 = x_t - sigma * v; sigma a float or a tensor broadcastable to x_t (per frame).

    ``compute_dtype`` float64 (the sampler, as Self-Forcing): computed in float64, cast back to
    v's dtype. None (training's per-frame forms): computed in the inputs' dtypes, not cast."""
    if compute_dtype is None:
        return x_t - sigma * v
    return (x_t.to(compute_dtype) - sigma * v.to(compute_dtype)).to(v.dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps; sigma a float or a tensor broadcastable to x0 (per
    frame). The result has the promoted dtype of x0 and eps (with sigma a float or in x0's dtype)."""
    return (1 - sigma) * x0 + sigma * eps
