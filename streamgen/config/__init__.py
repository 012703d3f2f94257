"""Dataclass configs for every engine component, with named presets.

One dataclass per component (model, action space, cache, sampler, pipeline). Presets are
looked up by name with ``from_name`` (gpt-fast style) in the read-only tables of
:mod:`streamgen.config.presets` (re-exported here: ``MODEL_PRESETS``, ``PIPELINE_PRESETS``);
``tiny`` is for CPU tests and ``wan2.1-t2v-1.3b`` is the real size. All validation happens
here, at the boundary.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import ConfigError
from .presets import MODEL_PRESETS, PIPELINE_PRESETS, WASD  # noqa: F401  (re-exported)


def _from_dict(cls, data: dict[str, Any] | None):
    """Build a (possibly nested) dataclass from a dict, rejecting unknown keys."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None:
            value = _from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{cls.__name__}: {e}") from None


class _FromDict:
    """``from_dict``: the validated constructor every config shares (unknown keys are errors)."""

    @classmethod
    def from_dict(cls, data):
        return _from_dict(cls, data)


class _Named(_FromDict):
    """``from_name``: a config looked up in its read-only preset table (``_presets``)."""

    _presets: Mapping[str, Any] = MappingProxyType({})
    _preset_kind = "preset"

    @classmethod
    def from_name(cls, name: str):
        if name not in cls._presets:
            known = ", ".join(sorted(cls._presets))
            raise ConfigError(f"unknown {cls._preset_kind} {name!r}; known: {known}")
        return _from_dict(cls, cls._presets[name])


def to_dict(cfg) -> dict[str, Any]:
    """Plain-JSON dict of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        # not dataclasses.asdict: it deep-copies values, and preset tables are read-only mappings
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    return json_ready(cfg)


def json_ready(obj):
    if isinstance(obj, Mapping):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


@dataclass(frozen=True)
class ActionSpace(_FromDict):
    """Per-frame actions: named keys as multi-hot plus an optional continuous mouse (dx, dy)."""

    keys: tuple[str, ...] = ()
    mouse: bool = False
    mouse_range: float = 1.0  # |dx|, |dy| must not exceed this

    def __post_init__(self):
        if len(set(self.keys)) != len(self.keys):
            raise ConfigError(f"action keys must be unique, got {list(self.keys)}")
        if self.mouse_range <= 0:
            raise ConfigError("action mouse_range must be > 0")

    @property
    def dim(self) -> int:
        return len(self.keys) + (2 if self.mouse else 0)

    @property
    def enabled(self) -> bool:
        return self.dim > 0

    def describe(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "mouse": self.mouse, "mouse_range": self.mouse_range}


@dataclass(frozen=True)
class ModelConfig(_Named):
    """Wan2.1-layout DiT. Names follow Wan's own config."""

    _presets = MODEL_PRESETS          # class attributes, not fields
    _preset_kind = "model preset"

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_pos: int = 1024  # rows of each RoPE table (Wan: 1024)
    rope_theta: float = 10000.0
    actions: ActionSpace = field(default_factory=ActionSpace)
    # "none" (Wan: position only through 3D RoPE) | "learned": absolute (row, col) embeddings
    # added after the patch embedding, so a small model knows where in the frame a token is
    pos_embed: str = "none"
    pos_grid: int = 32        # rows of each learned position table (max patch rows / cols)
    # where actions enter: "time" (added to the per-frame time embedding, so only through
    # adaLN) | "time+blocks" (also a per-block action MLP on [LN(token), action] added to every
    # token before self-attention: action x content interactions, Matrix-Game's action module
    # reduced to one MLP)
    action_inject: str = "time"
    # what else every frame sees besides its own noisy latent: "none" (Wan) | "last": the clean
    # latent of the previous chunk's last frame (zeros in the first chunk), patch-embedded by a
    # zero-initialised ``frame_cond_embedding`` and added to the tokens. DIAMOND and GameNGen
    # stack past frames on the input channels so that a small world model can copy and warp
    # what it saw; this is that idea reduced to one frame, kept out of the K/V path so the
    # cache, the masks and the Wan layout stay as they are. Streaming keeps the frame in the
    # cache (``StreamCache.last_frame``); full forwards take ``frame_cond=``.
    # "residual": "last", and the frame is also subtracted from the predicted flow, so the
    # network predicts the flow of the *change* since that frame (x0 = x_t - sigma (v_net - a)):
    # with nothing to add, x0 leans toward the last frame by sigma, a skip path that keeps its
    # edges instead of asking 16 tokens per frame to redraw them (video-prediction models
    # predict the residual to the last frame for the same reason).
    frame_cond: str = "none"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 8:
            raise ConfigError(f"head_dim {self.head_dim} must be even and >= 8")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size must be 3 positive ints, got {self.patch_size}")
        for name in ("dim", "ffn_dim", "num_layers", "in_channels", "out_channels",
                     "text_dim", "freq_dim", "text_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model {name} must be > 0")
        if self.freq_dim % 2:
            raise ConfigError("freq_dim must be even")
        for name in ("eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"model {name} must be a positive number, got {v!r}")
        if self.pos_embed not in ("none", "learned"):
            raise ConfigError(f"pos_embed must be 'none' or 'learned', got {self.pos_embed!r}")
        if self.pos_grid <= 0:
            raise ConfigError("pos_grid must be > 0")
        if self.action_inject not in ("time", "time+blocks"):
            raise ConfigError(f"action_inject must be 'time' or 'time+blocks', got {self.action_inject!r}")
        if self.frame_cond not in ("none", "last", "residual"):
            raise ConfigError(f"frame_cond must be 'none', 'last' or 'residual', got {self.frame_cond!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs per axis (t, h, w) of one head, as Wan splits them."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        ph, pw = self.patch_size[1], self.patch_size[2]
        if latent_h % ph or latent_w % pw:
            raise ConfigError(f"latent {latent_h}x{latent_w} is not divisible by patch {ph}x{pw}")
        return (latent_h // ph) * (latent_w // pw)

    def num_params(self) -> int:
        d, f, p = self.dim, self.ffn_dim, math.prod(self.patch_size)
        per_block = 8 * (d * d + d) + 4 * d + 2 * d + (d * f + f) + (f * d + d) + 6 * d
        rest = (self.in_channels * p * d + d) + (self.text_dim * d + d) + (d * d + d)
        rest += (self.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
        rest += 2 * d + d * self.out_channels * p + self.out_channels * p
        if self.actions.enabled:
            rest += self.actions.dim * d + d + d * d + d
        if self.frame_cond != "none":
            rest += self.in_channels * p * d + d
        return self.num_layers * per_block + rest




@dataclass(frozen=True)
class CacheConfig(_FromDict):
    """Streaming KV-cache memory policy.

    The cache keeps ``sink_frames`` first frames, an optional ``anchor_frames`` region filled
    at prompt switches, and a ring of the ``window_frames`` most recent frames (the current
    chunk included). Self-Forcing's ``local_attn_size`` equals ``sink_frames + window_frames``.
    ``window_frames=-1`` means "global": the ring holds ``max_frames`` frames.
    """

    sink: str = "frame"            # "frame" | "ema" | "none"
    sink_frames: int = 0
    window_frames: int = -1        # -1: global attention up to max_frames
    max_frames: int = 21           # ring size used when window_frames == -1
    anchor_frames: int = 0         # anchor region (filled on prompt switch)
    ema_alpha: float = 0.999       # EMA sink: sink <- alpha*sink + (1-alpha)*evicted
    rope: str = "absolute"         # "absolute" (keys cached with RoPE) | "relative"
    prompt_switch: str = "reset"   # "reset" (cross-attn only) | "recache"

    def __post_init__(self):
        if self.sink not in ("frame", "ema", "none"):
            raise ConfigError(f"cache.sink must be 'frame', 'ema' or 'none', got {self.sink!r}")
        if self.rope not in ("absolute", "relative"):
            raise ConfigError(f"cache.rope must be 'absolute' or 'relative', got {self.rope!r}")
        if self.prompt_switch not in ("reset", "recache"):
            raise ConfigError(f"cache.prompt_switch must be 'reset' or 'recache', got {self.prompt_switch!r}")
        if self.sink_frames < 0 or self.anchor_frames < 0:
            raise ConfigError("cache sink_frames/anchor_frames must be >= 0")
        if self.sink == "none" and self.sink_frames:
            raise ConfigError("cache.sink='none' needs sink_frames=0")
        if self.sink != "none" and self.sink == "ema" and self.sink_frames == 0:
            raise ConfigError("cache.sink='ema' needs sink_frames > 0")
        if self.sink == "ema" and self.rope != "relative":
            raise ConfigError("cache.sink='ema' blends keys of different frames, so it needs rope='relative'")
        if self.window_frames == 0 or self.window_frames < -1:
            raise ConfigError("cache.window_frames must be -1 (global) or > 0")
        if self.max_frames <= 0:
            raise ConfigError("cache.max_frames must be > 0")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ConfigError("cache.ema_alpha must be in [0, 1]")

    @property
    def ring_frames(self) -> int:
        return self.max_frames if self.window_frames == -1 else self.window_frames

    @property
    def total_frames(self) -> int:
        return self.sink_frames + self.anchor_frames + self.ring_frames



@dataclass(frozen=True)
class SamplerConfig(_FromDict):
    """Few-step flow-matching sampler (Self-Forcing's)."""

    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    warp: bool = True                # map steps through the shifted 1000-entry table
    shift: float = 5.0
    chunk_frames: int = 3            # latent frames per chunk (3 chunk-wise, 1 frame-wise)
    context_noise: float = 0.0       # timestep of the clean K/V pass after each chunk
    def __post_init__(self):
        if not self.denoising_steps:
            raise ConfigError("sampler.denoising_steps must not be empty")
        if any(not (0 < float(s) <= 1000) for s in self.denoising_steps):
            raise ConfigError("sampler.denoising_steps must lie in (0, 1000]")
        if list(self.denoising_steps) != sorted(self.denoising_steps, reverse=True):
            raise ConfigError("sampler.denoising_steps must be decreasing")
        if self.chunk_frames <= 0:
            raise ConfigError("sampler.chunk_frames must be > 0")
        if self.shift <= 0:
            raise ConfigError("sampler.shift must be > 0")
        if not 0 <= self.context_noise < 1000:
            raise ConfigError("sampler.context_noise must be in [0, 1000)")

    def with_steps(self, k: int) -> "SamplerConfig":
        """The same sampler with k evenly spaced steps from 1000 (k=4 -> 1000,750,500,250)."""
        if k <= 0:
            raise ConfigError("steps must be > 0")
        steps = tuple(1000.0 - 1000.0 * i / k for i in range(k))
        return dataclasses.replace(self, denoising_steps=steps)



@dataclass(frozen=True)
class PipelineConfig(_Named):
    """Everything a streaming pipeline needs besides weights."""

    _presets = PIPELINE_PRESETS       # class attribute, not a field

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vae: str = "preview"          # "preview" | "wan" | "taehv" | "tiny-ae" (shipped default)
    text_encoder: str = "hash"    # "hash" | "minilm" | "umt5"
    height: int = 480             # video pixels
    width: int = 832
    fps: int = 16
    spatial_stride: int = 8       # VAE pixel -> latent
    temporal_stride: int = 4      # video frames per latent frame (after the first, for Wan)
    max_prompt_chars: int = 2000

    def __post_init__(self):
        if self.vae not in ("preview", "wan", "taehv", "tiny-ae"):
            raise ConfigError(f"vae must be 'preview', 'wan', 'taehv' or 'tiny-ae', got {self.vae!r}")
        if self.text_encoder not in ("hash", "minilm", "umt5"):
            raise ConfigError(f"text_encoder must be 'hash', 'minilm' or 'umt5', got {self.text_encoder!r}")
        if self.height % self.spatial_stride or self.width % self.spatial_stride:
            raise ConfigError(f"{self.width}x{self.height} is not divisible by the VAE stride {self.spatial_stride}")
        if self.fps <= 0 or self.temporal_stride <= 0:
            raise ConfigError("fps and temporal_stride must be > 0")
        self.model.tokens_per_frame(self.latent_height, self.latent_width)
        if self.cache.ring_frames < self.sampler.chunk_frames:
            raise ConfigError(f"cache window ({self.cache.ring_frames} frames) is smaller than a chunk "
                              f"({self.sampler.chunk_frames} frames)")
        if self.cache.sink_frames % self.sampler.chunk_frames and self.cache.sink == "ema":
            raise ConfigError("an EMA sink must hold whole chunks")

    @property
    def latent_height(self) -> int:
        return self.height // self.spatial_stride

    @property
    def latent_width(self) -> int:
        return self.width // self.spatial_stride

    @property
    def tokens_per_frame(self) -> int:
        return self.model.tokens_per_frame(self.latent_height, self.latent_width)




_NESTED = {
    ("ModelConfig", "actions"): ActionSpace,
    ("PipelineConfig", "model"): ModelConfig,
    ("PipelineConfig", "cache"): CacheConfig,
    ("PipelineConfig", "sampler"): SamplerConfig,
}
