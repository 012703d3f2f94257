"""The shipped default model's small causal video autoencoder ("tiny-ae").

64x64 RGB <-> 8x8 latents with ``latent_channels`` channels: spatial stride 8 (or 16x16 latents
at ``stride=4``: more, smaller patches of the picture, for walls that stay sharp), temporal
stride 1 (every video frame is one latent frame). The encoder is per frame. The decoder is
streaming-causal: frame ``f`` is decoded from latents ``f`` and ``f - 1`` (a zero frame before
the first), so its state is just the previous latent frame and decoding chunk by chunk is
exactly the full decode. Latents are normalised per channel (``latent_mean``/``latent_std``
buffers, set once after training) so the DiT sees roughly unit-variance inputs.

    ae = TinyAutoencoder.from_state(state_dict_or_None, latent_channels=8)   # stride read from the weights
    z = ae.encode(video)                          # [B, T, 3, 64, 64] in [-1, 1] -> [B, T, 8, 8, 8]
    st = ae.init_state(B); frames, st = ae.decode_chunk(z[:, :3], st)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import VideoAutoencoder


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class TinyAutoencoder(VideoAutoencoder):
    temporal_stride = 1

    def __init__(self, latent_channels: int = 8, width: int = 32, stride: int = 8):
        super().__init__()
        if stride not in (4, 8):
            from ..errors import ConfigError
            raise ConfigError(f"tiny-ae spatial stride must be 4 or 8, got {stride}")
        self.latent_channels, self.width, self.spatial_stride = latent_channels, width, stride
        w1, w2, w3, w4 = width, 2 * width, 3 * width, 4 * width
        if stride == 8:
            self.encoder = nn.Sequential(
                nn.Conv2d(3, w1, 4, stride=2, padding=1), nn.SiLU(),             # 32
                nn.Conv2d(w1, w2, 4, stride=2, padding=1), nn.SiLU(),            # 16
                nn.Conv2d(w2, w4, 4, stride=2, padding=1), ResBlock(w4), nn.SiLU(),   # 8
                nn.Conv2d(w4, latent_channels, 1))
            self.decoder = nn.Sequential(
                nn.Conv2d(2 * latent_channels, w4, 3, padding=1), ResBlock(w4), nn.SiLU(),
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w4, w3, 3, padding=1), ResBlock(w3), nn.SiLU(),  # 16
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w3, w2, 3, padding=1), nn.SiLU(),            # 32
                nn.Conv2d(w2, 3 * 4, 3, padding=1), nn.PixelShuffle(2))                                         # 64
        else:
            self.encoder = nn.Sequential(
                nn.Conv2d(3, w1, 4, stride=2, padding=1), nn.SiLU(),             # 32
                nn.Conv2d(w1, w4, 4, stride=2, padding=1), ResBlock(w4), nn.SiLU(),   # 16
                nn.Conv2d(w4, latent_channels, 1))
            self.decoder = nn.Sequential(
                nn.Conv2d(2 * latent_channels, w4, 3, padding=1), ResBlock(w4), nn.SiLU(),                      # 16
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w4, w2, 3, padding=1), ResBlock(w2), nn.SiLU(),  # 32
                nn.Conv2d(w2, 3 * 4, 3, padding=1), nn.PixelShuffle(2))                                         # 64
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state(cls, state_dict: dict | None, latent_channels: int = 8, stride: int = 8) -> "TinyAutoencoder":
        """Random init (``None``: seed 0, drawn from a local generator, so the caller's global
        RNG is left as it was; ``stride``) or the trained weights; width and stride are read
        from the weights (one stride-2 4x4 encoder conv per factor of 2)."""
        if state_dict is None:
            return cls.random_init(latent_channels, torch.Generator().manual_seed(0), stride=stride)
        width = int(state_dict["encoder.0.weight"].shape[0])
        c = int(state_dict["latent_mean"].shape[0])
        if c != latent_channels:
            from ..errors import ConfigError
            raise ConfigError(f"tiny-ae weights have {c} latent channels, the model expects {latent_channels}")
        downs = sum(1 for k, v in state_dict.items()
                    if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 4 and v.shape[-1] == 4)
        ae = cls(latent_channels, width, stride=2 ** downs)
        ae.load_state_dict(state_dict, strict=True)
        return ae

    @classmethod
    def random_init(cls, latent_channels: int = 8, generator: torch.Generator | None = None,
                    width: int = 32, stride: int = 8) -> "TinyAutoencoder":
        """torch's default init (``nn.Conv2d.reset_parameters``), drawn from ``generator`` in
        construction order: the same weights as building the module after
        ``torch.manual_seed(s)`` when ``generator`` is seeded with ``s``, without touching the
        global RNG. Buffers get their defaults (mean 0, std 1)."""
        with torch.device("meta"):
            ae = cls(latent_channels, width, stride)
        ae = ae.to_empty(device="cpu")
        with torch.no_grad():
            for m in ae.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
                elif next(m.parameters(recurse=False), None) is not None:   # pragma: no cover
                    raise TypeError(f"random_init does not know how to initialise {type(m).__name__}")
            ae.latent_mean.zero_()
            ae.latent_std.fill_(1.0)
        return ae

    # ------------------------------------------------------------------ raw (unnormalised) pieces
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> unnormalised latents [B, T, C, H/s, W/s] (s = spatial_stride)."""
        B, T = video.shape[:2]
        return self.encoder(video.flatten(0, 1)).unflatten(0, (B, T))

    def decode_raw(self, z: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised latents [B, T, C, h, w] (+ the frame before them) -> pixels [B, T, 3, H, W]."""
        B, T = z.shape[:2]
        if prev is None:
            prev = torch.zeros_like(z[:, :1])
        shifted = torch.cat([prev, z[:, :-1]], dim=1)                       # latent f-1 for every f
        x = torch.cat([z, shifted], dim=2).flatten(0, 1)                     # [B*T, 2C, h, w]
        return self.decoder(x).unflatten(0, (B, T))

    # ------------------------------------------------------------------ VideoAutoencoder API
    def _norm(self, z):
        return (z - self.latent_mean.view(1, 1, -1, 1, 1)) / self.latent_std.view(1, 1, -1, 1, 1)

    def _denorm(self, z):
        return z * self.latent_std.view(1, 1, -1, 1, 1) + self.latent_mean.view(1, 1, -1, 1, 1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self._norm(self.encode_raw(video.to(self.latent_mean.dtype)))

    def init_state(self, batch: int):
        return {"prev": None}

    def decode_chunk(self, latents: torch.Tensor, state):
        z = self._denorm(latents.to(self.latent_mean.dtype))
        frames = self.decode_raw(z, state["prev"]).clamp(-1, 1)
        return frames, {"prev": z[:, -1:].detach()}

    @torch.no_grad()
    def set_latent_stats(self, video: torch.Tensor):
        """Fit the per-channel normalisation on a batch of videos [B, T, 3, H, W]."""
        z = self.encode_raw(video)
        self.latent_mean.copy_(z.mean(dim=(0, 1, 3, 4)))
        self.latent_std.copy_(z.std(dim=(0, 1, 3, 4)).clamp_min(1e-4))
