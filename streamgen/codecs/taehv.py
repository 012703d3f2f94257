"""A small TAEHV-style causal video decoder: latents -> RGB, streamed chunk by chunk.

Selectable as ``vae="taehv"``. Same latent space and frame counts as the Wan VAE it is
distilled from (training/distill_decoder.py): latents are Wan-normalised [B, F, C, h, w],
spatial stride 8, temporal stride 4, and the first latent frame gives one video frame.

Structure (after madebyollin's TAEHV decoder): per-frame 2D convs, plus ``MemBlock``s that
see the current frame and the previous frame's input of the same block (the only temporal
context), and ``TGrow`` layers that turn one frame into ``stride`` frames. A MemBlock over a
chunk runs in parallel: its "previous frame" input is the chunk shifted by one, the first
frame taking the last frame of the previous chunk from the streaming state. So chunked
decode equals full decode, and the state is one frame per MemBlock.

    dec = TAEHV(TAEHVConfig(latent_channels=16))
    state = dec.init_state(1)
    frames, state = dec.decode_chunk(latents, state)          # [B, n, 3, H, W] in [-1, 1]
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from .base import VideoAutoencoder

CONFIG_KEY = "taehv_config"


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    channels: tuple[int, ...] = (256, 128, 64, 64)         # stage widths, last = before RGB
    temporal_upscale: tuple[bool, ...] = (False, True, True)  # x2 in time per stage
    blocks_per_stage: int = 3

    def __post_init__(self):
        if len(self.channels) != len(self.temporal_upscale) + 1:
            raise ConfigError("taehv: channels needs one more entry than temporal_upscale")
        if self.latent_channels <= 0 or min(self.channels) <= 0 or self.blocks_per_stage < 1:
            raise ConfigError("taehv: channel counts and blocks_per_stage must be > 0")

    @property
    def spatial_stride(self) -> int:
        return 2 ** len(self.temporal_upscale)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_upscale)


def _conv(cin, cout, **kw):
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class MemBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv([x, x_prev]))))) + x)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * c, c), nn.ReLU(inplace=True), _conv(c, c), nn.ReLU(inplace=True), _conv(c, c))

    def forward(self, x, prev):
        # x, prev [N, c, H, W]
        return F.relu(self.conv(torch.cat([x, prev], dim=1)) + x)


class TGrow(nn.Module):
    """One frame -> ``stride`` frames (1x1 conv to stride*c channels)."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

    def forward(self, x, B):
        # x [B*T, c, H, W] -> [B*T*stride, c, H, W], frames in time order
        y = self.conv(x)
        return y.reshape(x.shape[0] * self.stride, x.shape[1], *x.shape[2:])


class TAEHV(VideoAutoencoder):
    def __init__(self, cfg: TAEHVConfig | None = None):
        super().__init__()
        cfg = cfg or TAEHVConfig()
        self.cfg = cfg
        self.latent_channels, self.spatial_stride, self.temporal_stride = (
            cfg.latent_channels, cfg.spatial_stride, cfg.temporal_stride)
        ch = cfg.channels
        self.conv_in = _conv(cfg.latent_channels, ch[0])
        self.stages = nn.ModuleList()
        for i, tup in enumerate(cfg.temporal_upscale):
            stage = nn.Module()
            stage.blocks = nn.ModuleList(MemBlock(ch[i]) for _ in range(cfg.blocks_per_stage))
            stage.grow = TGrow(ch[i], 2 if tup else 1)
            stage.conv = _conv(ch[i], ch[i + 1], bias=False)
            self.stages.append(stage)
        self.conv_out = _conv(ch[-1], 3)
        self.n_mem = len(cfg.temporal_upscale) * cfg.blocks_per_stage

    # ------------------------------------------------------------------ streaming
    def init_state(self, batch: int):
        return {"prev": [None] * self.n_mem, "frames": 0}

    def _run(self, z, state):
        # z [B, k, C, h, w] -> rgb [B, k*ts, 3, H, W], new per-MemBlock last frames
        B = z.shape[0]
        x = torch.tanh(z / 3) * 3                                           # TAEHV's latent clamp
        x = F.relu(self.conv_in(x.flatten(0, 1)))                           # [B*T, c0, h, w]
        new_prev, m = [], 0
        for stage in self.stages:
            for blk in stage.blocks:
                T = x.shape[0] // B
                xt = x.unflatten(0, (B, T))                                 # [B, T, c, H, W]
                last = state["prev"][m]
                if last is None:
                    last = torch.zeros_like(xt[:, :1])
                prev = torch.cat([last, xt[:, :-1]], dim=1)                 # frame t sees t-1
                new_prev.append(xt[:, -1:])
                x = blk(x, prev.flatten(0, 1))
                m += 1
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = stage.grow(x, B)
            x = stage.conv(x)
        x = self.conv_out(F.relu(x))
        return x.unflatten(0, (B, -1)), new_prev

    def decode_chunk(self, latents, state):
        """latents [B, k, C, h, w] -> frames [B, n, 3, H, W] (n = 1 + ts(k-1) first, else ts*k)."""
        dtype = next(self.parameters()).dtype
        rgb, prev = self._run(latents.to(dtype), state)
        if state["frames"] == 0:
            rgb = rgb[:, self.temporal_stride - 1:]                          # Wan: frame 0 -> 1 frame
        rgb = rgb.float().clamp(-1, 1)
        return rgb, {"prev": prev, "frames": state["frames"] + latents.shape[1]}

    def forward(self, latents):
        """Full decode with gradients (training)."""
        rgb, _ = self._run(latents, self.init_state(latents.shape[0]))
        return rgb[:, self.temporal_stride - 1:]

    # ------------------------------------------------------------------ files
    def save(self, path: str):
        from safetensors.torch import save_file
        cfg = asdict(self.cfg)
        meta = {CONFIG_KEY: json.dumps(cfg)}
        save_file({k: v.detach().contiguous().cpu().float() for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | None, latent_channels: int | None = None, random_weights: bool = False,
             temporal_stride: int = 4) -> "TAEHV":
        if path is None:
            if not random_weights:
                raise ConfigError("vae 'taehv' needs weights: --vae-path FILE.safetensors (train them with "
                                  "`python -m streamgen.training.distill_decoder`), or random weights")
            ups = {1: (False, False, False), 2: (False, False, True), 4: (False, True, True),
                   8: (True, True, True)}
            if temporal_stride not in ups:
                raise ConfigError(f"taehv: temporal stride must be 1, 2, 4 or 8, got {temporal_stride}")
            return cls(TAEHVConfig(latent_channels=latent_channels or 16, temporal_upscale=ups[temporal_stride]))
        from ..io.checkpoint import check_and_load, read_weights
        if os.path.isdir(path):
            path = os.path.join(path, "taehv.safetensors")
        sd, meta = read_weights(path)
        if CONFIG_KEY not in meta:
            raise CheckpointError(f"{path}: not a streamgen TAEHV file (no '{CONFIG_KEY}' metadata)")
        try:
            raw = json.loads(meta[CONFIG_KEY])
            cfg = TAEHVConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: bad '{CONFIG_KEY}' metadata ({e})") from None
        if latent_channels is not None and cfg.latent_channels != latent_channels:
            raise CheckpointError(f"{path}: TAEHV decodes {cfg.latent_channels}-channel latents, the model "
                                  f"makes {latent_channels}")
        dec = cls(cfg)
        check_and_load(dec, sd, source=path)
        return dec
