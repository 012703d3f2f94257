"""The "wan" video autoencoder: diffusers' ``AutoencoderKLWan`` (a local directory, or random
weights for speed) behind :class:`streamgen.codecs.base.VideoAutoencoder`, decoded causally
chunk by chunk."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import VideoAutoencoder


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
