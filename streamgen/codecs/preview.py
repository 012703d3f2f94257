"""The "preview" decoder: a fixed, weight-free latent->RGB map (channel mix + nearest
upsampling). For random-weight presets and tests: it shows the latents, it is not a trained
decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import VideoAutoencoder


class PreviewDecoder(VideoAutoencoder):
    """Weight-free latent preview: a fixed orthogonal channel mix to RGB, nearest upsampling."""

    def __init__(self, latent_channels: int, spatial_stride: int = 8, temporal_stride: int = 1):
        super().__init__()
        self.latent_channels, self.spatial_stride, self.temporal_stride = latent_channels, spatial_stride, temporal_stride
        g = torch.Generator().manual_seed(0)
        mix = torch.linalg.qr(torch.randn(max(latent_channels, 3), max(latent_channels, 3), generator=g))[0]
        self.register_buffer("mix", mix[:latent_channels, :3].contiguous(), persistent=False)   # [C, 3]

    def encode(self, video):
        B, T, _, H, W = video.shape
        s, ts = self.spatial_stride, self.temporal_stride
        x = F.avg_pool2d(video.flatten(0, 1), s).unflatten(0, (B, T))[:, ::ts]        # [B, F, 3, h, w]
        return torch.einsum("bfchw,kc->bfkhw", x, self.mix)

    def decode_chunk(self, latents, state):
        rgb = torch.einsum("bfkhw,kc->bfchw", latents.float(), self.mix).clamp(-1, 1)
        up = F.interpolate(rgb.flatten(0, 1), scale_factor=self.spatial_stride, mode="nearest")
        up = up.unflatten(0, latents.shape[:2])
        if self.temporal_stride > 1:
            up = up.repeat_interleave(self.temporal_stride, dim=1)
        return up, state
