"""The codec factories: a config's ``vae`` / ``text_encoder`` name -> the codec object.

``build_vae(kind, ...)``: "preview", "wan", "taehv" or "tiny-ae" (checks the codec's latent
channels and strides against what the model expects). ``build_text_encoder(kind, ...)``:
"hash", "minilm" or "umt5".
"""
from __future__ import annotations

from ..errors import ConfigError
from .preview import PreviewDecoder
from .text import HashTextEncoder, MiniLMTextEncoder, UMT5TextEncoder
from .vae import WanVAE


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
            from ..io.checkpoint import read_weights
            state_dict, _ = read_weights(path)
        if state_dict is None and not random_weights:
            raise ConfigError("vae 'tiny-ae' needs its trained weights: an autoencoder.safetensors next to the "
                              "model file, vae_path=..., or random weights")
        vae = TinyAutoencoder.from_state(state_dict, latent_channels=latent_channels,
                                         stride=spatial_stride).to(device).eval()
    else:
        raise ConfigError(f"unknown vae {kind!r}")
    got = (vae.latent_channels, vae.spatial_stride, vae.temporal_stride)
    if got != (latent_channels, spatial_stride, temporal_stride):
        raise ConfigError(f"vae {kind!r} has (latent channels, spatial, temporal stride) {got} but the model "
                          f"expects {(latent_channels, spatial_stride, temporal_stride)}")
    return vae


def build_text_encoder(kind: str, text_dim: int, text_len: int, path: str | None = None, device="cpu",
                       random_weights: bool = False):
    if kind == "hash":
        return HashTextEncoder(text_dim, text_len)
    if kind == "minilm":
        return MiniLMTextEncoder(text_dim, text_len, device)
    if kind == "umt5":
        if path is None and random_weights:
            # Speed runs with random DiT weights: UMT5 runs once per prompt, off the chunk path,
            # so a same-shape stand-in ([1, 512, 4096]) keeps the DiT's work identical.
            enc = HashTextEncoder(text_dim, text_len)
            enc.kind = "hash (umt5 stand-in: random weights, no --text-encoder-path)"
            return enc
        return UMT5TextEncoder(path, text_len, device, text_dim=text_dim)
    raise ConfigError(f"unknown text encoder {kind!r}")
