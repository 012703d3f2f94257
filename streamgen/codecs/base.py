"""The one small interface every video autoencoder implements (encode / streaming causal decode).

Pixels are float in [-1, 1], frame-major: video [B, T, 3, H, W]; latents [B, F, C, h, w].
Streaming decode is chunk by chunk with an explicit state object, so a session can decode
each generated chunk as soon as it exists:

    state = vae.init_state(batch)
    frames, state = vae.decode_chunk(latents_chunk, state)   # [B, n, 3, H, W]

The implementations, one file each: "preview" (:mod:`streamgen.codecs.preview`), "wan"
(:mod:`streamgen.codecs.vae`), "taehv" (:mod:`streamgen.codecs.taehv`), "tiny-ae"
(:mod:`streamgen.codecs.autoencoder`); :func:`streamgen.codecs.factory.build_vae` picks one.
"""
from __future__ import annotations

from typing import Any

import torch


class VideoAutoencoder(torch.nn.Module):
    latent_channels: int
    spatial_stride: int
    temporal_stride: int

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_state(self, batch: int) -> Any:
        return None

    def decode_chunk(self, latents: torch.Tensor, state: Any):
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Full decode = every chunk decoded in order from a fresh state."""
        frames, _ = self.decode_chunk(latents, self.init_state(latents.shape[0]))
        return frames
