"""Video autoencoders behind one small interface (encode / streaming causal decode).

Pixels are float in [-1, 1], frame-major: video [B, T, 3, H, W]; latents [B, F, C, h, w].
Streaming decode is chunk by chunk with an explicit state object, so a session can decode
each generated chunk as soon as it exists:

    state = vae.init_state(batch)
    frames, state = vae.decode_chunk(latents_chunk, state)   # [B, n, 3, H, W]

- "preview": a fixed, weight-free latent->RGB map (channel mix + nearest upsampling). For
  random-weight presets and tests: it shows the latents, it is not a trained decoder.
- "wan": diffusers' ``AutoencoderKLWan`` (a local directory, or random weights for speed).
- "taehv": the project's small TAEHV-style causal decoder (streamgen.taehv), distilled from
  the Wan decoder by training/distill_decoder.py; decode only.
- "tiny-ae": the project's own small causal autoencoder (streamgen.autoencoder).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError


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


class WanVAE(VideoAutoencoder):
    """diffusers' AutoencoderKLWan; decoded causally chunk by chunk with its feature cache.

    Latents are normalised as in Wan/Self-Forcing: ``(mu - latents_mean) / latents_std``.
    Decoding latent frame i needs the causal-conv feature cache of frames < i; the state
    holds that cache (a list of tensors, one per causal conv), so chunked decode equals
    diffusers' full ``decode`` exactly. The first latent frame gives 1 video frame, every
    later one ``temporal_stride`` frames.
    """

    def __init__(self, path: str | None = None, config: dict | None = None, device="cpu",
                 dtype=torch.float32):
        super().__init__()
        from diffusers import AutoencoderKLWan
        if path:
            try:
                self.vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
            except (OSError, ValueError, EnvironmentError) as e:
                raise ConfigError(f"vae 'wan': cannot load AutoencoderKLWan from {path!r} "
                                  f"({str(e).splitlines()[0][:160]})") from None
        else:
            self.vae = AutoencoderKLWan(**(config or {}))
            if dtype != torch.float32:
                self.vae = self.vae.to(dtype)
        self.vae = self.vae.to(device).eval()
        cfg = self.vae.config
        self.latent_channels = cfg.z_dim
        self.spatial_stride = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** (len(cfg.dim_mult) - 1))
        self.temporal_stride = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        mean = list(cfg.latents_mean) if cfg.latents_mean else [0.0] * cfg.z_dim
        std = list(cfg.latents_std) if cfg.latents_std else [1.0] * cfg.z_dim
        if len(mean) != cfg.z_dim or len(std) != cfg.z_dim:
            raise ConfigError(f"AutoencoderKLWan: latents_mean/std have {len(mean)}/{len(std)} entries but "
                              f"z_dim is {cfg.z_dim} (pass latents_mean/latents_std of that length)")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", (1.0 / torch.tensor(std)).view(1, -1, 1, 1, 1), persistent=False)

    @torch.no_grad()
    def encode(self, video):
        x = video.transpose(1, 2).to(self.vae.dtype)                           # [B, 3, T, H, W]
        mu = self.vae.encode(x).latent_dist.mode()                              # [B, C, F, h, w]
        return ((mu.float() - self.mean) * self.inv_std).transpose(1, 2)        # [B, F, C, h, w]

    def init_state(self, batch):
        return {"feat": None, "frames": 0}

    @torch.no_grad()
    def decode_chunk(self, latents, state):
        """latents [B, k, C, h, w] -> frames [B, n, 3, H, W] (n = 1 + 4(k-1) first, else 4k)."""
        vae = self.vae
        z = (latents.float().transpose(1, 2) / self.inv_std + self.mean).to(vae.dtype)   # [B, C, k, h, w]
        if state["feat"] is None:
            vae.clear_cache()
            feat = vae._feat_map
        else:
            feat = list(state["feat"])      # entries are replaced, never mutated: the old state stays valid
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            idx = [0]
            first = state["frames"] == 0 and i == 0
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=feat, feat_idx=idx, first_chunk=first))
        out = torch.cat(outs, dim=2)
        if getattr(vae.config, "patch_size", None) is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            out = unpatchify(out, patch_size=vae.config.patch_size)
        out = out.clamp(-1, 1)
        return out.transpose(1, 2).float(), {"feat": feat, "frames": state["frames"] + x.shape[2]}


def build_vae(kind: str, latent_channels: int, spatial_stride: int, temporal_stride: int,
              path: str | None = None, device="cpu", state_dict=None, random_weights=False):
    if kind == "preview":
        return PreviewDecoder(latent_channels, spatial_stride, temporal_stride).to(device)
    if kind == "wan":
        if path is None and not random_weights:
            raise ConfigError("vae 'wan' needs a local AutoencoderKLWan directory (or random weights)")
        vae = WanVAE(path, device=device)
    elif kind == "taehv":
        from .taehv import TAEHV
        vae = TAEHV.load(path, latent_channels=latent_channels, random_weights=random_weights,
                         temporal_stride=temporal_stride).to(device).eval()
    elif kind == "tiny-ae":
        from .autoencoder import TinyAutoencoder
        if state_dict is None and path is not None:
            from .checkpoint import read_weights
            state_dict, _ = read_weights(path)
        if state_dict is None and not random_weights:
            raise ConfigError("vae 'tiny-ae' needs its trained weights: an autoencoder.safetensors next to the "
                              "model file, vae_path=..., or random weights")
        ae = TinyAutoencoder.from_state(state_dict, latent_channels=latent_channels)
        return ae.to(device).eval()
    else:
        raise ConfigError(f"unknown vae {kind!r}")
    got = (vae.latent_channels, vae.spatial_stride, vae.temporal_stride)
    if got != (latent_channels, spatial_stride, temporal_stride):
        raise ConfigError(f"vae {kind!r} has (latent channels, spatial, temporal stride) {got} but the model "
                          f"expects {(latent_channels, spatial_stride, temporal_stride)}")
    return vae
