"""A small action-conditioned critic of latent frame transitions (training only).

It sees one transition, the latent frame before and after ([2, C, H, W]) and the action in force,
and says whether it is the world's (real) or the student's (fake). Trained with a hinge loss beside
the student's flow-matching loss (``adv_weight`` in the run config), it pushes the student's x0
toward sharp frames (a regression target alone rewards the blur of the mean, as in pix2pix and
SAVP), and, being conditioned on the keys by projection (Miyato & Koyama 2018) and shown real
transitions with another clip's keys as fakes (``mismatch``), toward motion that fits the keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


class TransitionCritic(nn.Module):
    def __init__(self, channels: int, action_dim: int, width: int = 64):
        super().__init__()
        sn = spectral_norm
        w = width
        self.trunk = nn.Sequential(
            sn(nn.Conv2d(3 * channels, w, 3, 1, 1)), nn.LeakyReLU(0.2),             # [w, H, W]
            sn(nn.Conv2d(w, 2 * w, 4, 2, 1)), nn.LeakyReLU(0.2),                    # [2w, H/2, W/2]
            sn(nn.Conv2d(2 * w, 2 * w, 4, 2, 1)), nn.LeakyReLU(0.2))                # [2w, H/4, W/4]
        self.out = sn(nn.Conv2d(2 * w, 1, 3, 1, 1))                                 # patch logits
        self.embed = sn(nn.Linear(action_dim, 2 * w)) if action_dim > 0 else None

    def forward(self, pair: torch.Tensor, action: torch.Tensor | None = None) -> torch.Tensor:
        """pair [N, 2, C, H, W], action [N, A] (or None) -> patch logits [N, H/4 * W/4]."""
        a, b = pair[:, 0], pair[:, 1]
        h = self.trunk(torch.cat([a, b, b - a], 1))                                 # [N, 2w, h, w]
        logits = self.out(h)[:, 0]                                                  # [N, h, w]
        if self.embed is not None and action is not None:
            logits = logits + (h * self.embed(action)[:, :, None, None]).sum(1) / h.shape[1] ** 0.5
        return logits.flatten(1)
