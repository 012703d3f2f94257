"""Wan's 3D rotary position embedding (interleaved pairs, head dim split over t, h, w).

Per head the ``head_dim/2`` complex pairs are split ``(c - 2*(c//3), c//3, c//3)`` over
(time, height, width); each axis has its own frequency table ``theta^(-2i/d_axis)``.
Adjacent channels (2i, 2i+1) form a pair (not the half-rotation layout).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig


def axis_angles(max_pos: int, pairs: int, theta: float) -> torch.Tensor:
    """Angles [max_pos, pairs] (float64) for one axis with ``pairs`` complex pairs."""
    dim = 2 * pairs
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)


class RopeTables:
    """cos/sin tables per axis in fp32 (never cast with the model: bf16 tables lose positions).

    Not an nn.Module on purpose: ``model.to(bfloat16)`` must not touch them. Copies per device
    are made on first use.
    """

    def __init__(self, cfg: ModelConfig):
        self.split = cfg.rope_split
        self.max_pos = cfg.rope_max_pos
        self._tables: dict[str, dict[str, torch.Tensor]] = {"cpu": {}}
        for name, pairs in zip("thw", self.split):
            ang = axis_angles(cfg.rope_max_pos, pairs, cfg.rope_theta)
            self._tables["cpu"][f"cos_{name}"] = ang.cos().float()
            self._tables["cpu"][f"sin_{name}"] = ang.sin().float()

    def tables(self, device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            self._tables[key] = {k: v.to(device) for k, v in self._tables["cpu"].items()}
        return self._tables[key]

    def grid(self, frame_pos: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, F*h*w, head_dim/2] for frame positions ``frame_pos`` [B, F] (long)."""
        B, F = frame_pos.shape
        tb = self.tables(frame_pos.device)
        ct, st = tb["cos_t"][frame_pos], tb["sin_t"][frame_pos]          # [B, F, c_t]
        ch, sh = tb["cos_h"][:h], tb["sin_h"][:h]                        # [h, c_h]
        cw, sw = tb["cos_w"][:w], tb["sin_w"][:w]                        # [w, c_w]

        def build(t, hh, ww):
            t = t[:, :, None, None, :].expand(B, F, h, w, -1)
            hh = hh[None, None, :, None, :].expand(B, F, h, w, -1)
            ww = ww[None, None, None, :, :].expand(B, F, h, w, -1)
            return torch.cat([t, hh, ww], dim=-1).reshape(B, F * h * w, -1)

        return build(ct, ch, cw), build(st, sh, sw)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by cos/sin [B, L, D/2]; computed in fp32."""
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))                               # [B, L, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).to(dtype)
