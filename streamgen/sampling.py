"""Flow-matching schedule and the few-step chunk sampler, separate from the model.

Conventions (Wan / Self-Forcing): x_t = (1 - sigma) x0 + sigma * eps, t = 1000 * sigma, the
model predicts the flow v = eps - x0, so x0 = x_t - sigma * v.

The "table" is Self-Forcing's 1000-entry shifted schedule: sigma_k = s(1 - k/1000) with
s(u) = shift*u / (1 + (shift-1)*u). "Warped" step lists index it: t_i = table[1000 - step_i].
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import SamplerConfig


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


class FewStepSampler:
    """Denoises one chunk in ``len(timesteps)`` model calls with fresh noise in between."""

    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        self.schedule = FlowSchedule(cfg.shift)
        steps = [float(s) for s in cfg.denoising_steps]
        self.timesteps = self.schedule.warp(steps) if cfg.warp else steps
        self.sigmas = [t / 1000.0 for t in self.timesteps]
        self.context_sigma = cfg.context_noise / 1000.0

    def sample(self, flow: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
               draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run the few-step loop on one chunk.

        flow(x, t) -> v (same shape as x); noise: initial x [B, k, C, H, W];
        draw() -> fresh noise shaped like x. Returns x0 in the dtype of ``noise``.
        """
        x = noise
        x0 = noise
        for i, t in enumerate(self.timesteps):
            x0 = to_x0(x, flow(x, t), self.sigmas[i])
            if i + 1 < len(self.timesteps):
                x = add_noise(x0, draw(), self.sigmas[i + 1])
        return x0

    def context_input(self, x0: torch.Tensor, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """What the clean-context K/V pass sees (x0, re-noised if context_noise > 0)."""
        if self.context_sigma == 0:
            return x0
        return add_noise(x0, draw(), self.context_sigma)


def to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x_t - sigma * v, in float64 and cast back (as Self-Forcing)."""
    return (x_t.double() - sigma * v.double()).to(v.dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps; sigma a float or a tensor broadcastable to x0."""
    return ((1 - sigma) * x0 + sigma * eps).to(eps.dtype)
