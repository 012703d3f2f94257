"""The user-facing streaming pipeline: load a model, open sessions, step chunk by chunk.

    pipe = Pipeline.from_pretrained("default")                 # the shipped world model
    pipe = Pipeline.from_pretrained("tiny", random_weights=True)
    s = pipe.session("a brick dungeon at dusk", seed=0)
    frames = s.step({"keys": ["W"], "mouse": [0.2, 0.0]})     # uint8 [T, H, W, 3]
    s.set_prompt("an ice cave in fog")                         # engine's prompt-switch policy

A session owns a preallocated cache, so it runs forever at constant memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import torch

from ..codecs.factory import build_text_encoder, build_vae
from ..codecs.text import check_prompt
from ..config import PIPELINE_PRESETS, PipelineConfig
from ..errors import ConfigError
from ..io.actions import encode_action
from ..io.checkpoint import check_and_load, load_checkpoint, read_weights
from ..models.attention import check_backend, resolve_backend
from ..models.model import WanDiT
from .cache import StreamCache
from .chunk_step import generate_chunk
from .sampling import FewStepSampler

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SHIPPED = {"default": os.path.join(ASSETS, "default")}


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if d not in table:
        raise ConfigError(f"unknown dtype {d!r}; use float32, bfloat16 or float16")
    return table[d]


class Pipeline:
    def __init__(self, config: PipelineConfig, model: WanDiT, vae, text_encoder, device="cpu",
                 dtype=torch.float32, attn_backend="sdpa", source: str = "", trained: bool = True):
        self.config, self.model, self.vae, self.text_encoder = config, model, vae, text_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.source, self.trained = source, trained
        self.set_attn_backend(attn_backend)
        self.sampler = FewStepSampler(config.sampler)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, device="cpu", dtype=torch.float32, attn_backend: str = "sdpa",
                        random_weights: bool = False, config: PipelineConfig | str | dict | None = None,
                        steps: int | None = None, text_encoder_path: str | None = None,
                        vae_path: str | None = None, **overrides) -> "Pipeline":
        """A shipped model name ("default"), a preset (with ``random_weights=True``), or a path.

        ``config`` gives the pipeline config for checkpoints that carry none (a preset name,
        a dict or a PipelineConfig). ``overrides`` replace top-level PipelineConfig fields.
        """
        check_backend(attn_backend)
        dtype = _dtype(dtype)
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA GPU is available")
        sd, ae_sd, meta_cfg, trained = None, None, None, True
        if name_or_path in SHIPPED:
            root = SHIPPED[name_or_path]
            if not os.path.exists(os.path.join(root, "config.json")):
                raise ConfigError(f"the shipped model {name_or_path!r} is not in this install ({root})")
            with open(os.path.join(root, "config.json"), encoding="utf-8") as f:
                meta_cfg = json.load(f)
            if not random_weights:
                sd, _ = read_weights(os.path.join(root, "model.safetensors"))
            ae_path = os.path.join(root, "autoencoder.safetensors")
            if os.path.exists(ae_path):
                ae_sd, _ = read_weights(ae_path)
        elif name_or_path in PIPELINE_PRESETS and not os.path.exists(name_or_path):
            if not random_weights:
                raise ConfigError(f"{name_or_path!r} is a preset without weights: pass random_weights=True "
                                  "(--random-weights) or a checkpoint path")
            meta_cfg = dict(PIPELINE_PRESETS[name_or_path])
        else:
            if not os.path.exists(name_or_path):
                raise ConfigError(f"unknown model {name_or_path!r}: not a shipped model ({', '.join(SHIPPED)}), "
                                  f"a preset ({', '.join(sorted(PIPELINE_PRESETS))}) or an existing path")
            # Any layout (Self-Forcing .pt, Wan2.1, diffusers); config: explicit > metadata >
            # config.json > family from the file name (streamgen.io.checkpoint.load_checkpoint).
            ck = load_checkpoint(name_or_path, config=config)
            sd, meta_cfg, ae_sd, config = ck.state_dict, ck.config, ck.autoencoder, None
        if config is not None:
            meta_cfg = config
        if meta_cfg is None:
            raise ConfigError(f"{name_or_path}: the checkpoint carries no config; pass config=<preset name>")
        cfg = (meta_cfg if isinstance(meta_cfg, PipelineConfig) else
               PipelineConfig.from_name(meta_cfg) if isinstance(meta_cfg, str) else PipelineConfig.from_dict(meta_cfg))
        if steps is not None:
            overrides["sampler"] = cfg.sampler.with_steps(steps)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if random_weights:
            sd, trained = None, False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)                          # reproducible random-weight models
            model = WanDiT(cfg.model)
        if sd is not None:
            check_and_load(model, sd, source=str(name_or_path))
        model = model.to(device=device, dtype=dtype).eval()
        vae = build_vae(cfg.vae, cfg.model.out_channels, cfg.spatial_stride, cfg.temporal_stride,
                        path=vae_path, device=device, state_dict=ae_sd, random_weights=random_weights)
        text = build_text_encoder(cfg.text_encoder, cfg.model.text_dim, cfg.model.text_len,
                                  path=text_encoder_path, device=device, random_weights=random_weights)
        return cls(cfg, model, vae, text, device=device, dtype=dtype, attn_backend=attn_backend,
                   source=str(name_or_path), trained=trained)

    # ------------------------------------------------------------------ pieces
    def set_attn_backend(self, name: str):
        check_backend(name)
        self.attn_backend = resolve_backend(name, self.device)
        self.model.attn_backend = self.attn_backend

    def encode_prompt(self, prompt: str):
        """Prompt -> per-layer cross-attention K/V (cached per session)."""
        prompt = check_prompt(prompt, self.config.max_prompt_chars)
        emb = self.text_encoder(prompt).to(self.device, self.dtype)
        with torch.no_grad():
            return self.model.cross_kv(emb)

    def encode_actions(self, action, frames: int) -> torch.Tensor | None:
        """None | dict | list of dicts (one per latent frame) -> [1, frames, action_dim]."""
        space = self.config.model.actions
        if not space.enabled:
            return None
        acts = action if isinstance(action, (list, tuple)) else [action] * frames
        if len(acts) != frames:
            raise ConfigError(f"expected {frames} per-frame actions, got {len(acts)}")
        vec = torch.stack([encode_action(space, a) for a in acts])
        return vec[None].to(self.device, self.dtype)

    def new_cache(self, batch: int = 1) -> StreamCache:
        c = self.config
        return StreamCache(c.model, c.cache, batch, c.tokens_per_frame, c.sampler.chunk_frames,
                           device=self.device, dtype=self.dtype, latent_hw=(c.latent_height, c.latent_width))

    def to_uint8(self, frames: torch.Tensor) -> np.ndarray:
        """[-1, 1] float [T, 3, H, W] -> uint8 [T, H, W, 3]."""
        x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    def session(self, prompt: str, seed: int | None = None, start=None, start_actions=None) -> "Session":
        """A new stream. ``start``: None (generate from noise), uint8 frames [N, H, W, 3] (N a
        whole number of chunks of video frames) written into the cache as clean context, or
        "world" (world models: the built-in world's rendering of the prompt's look at the
        seed's spawn, one chunk). ``start_actions``: the opening frames' actions (one dict, or
        one per frame; default: no keys)."""
        return Session(self, prompt, seed, start=start, start_actions=start_actions)

    def opening_frames(self, prompt: str, seed: int) -> np.ndarray:
        """One chunk of the built-in world's frames for ``prompt`` and ``seed`` (uint8 [k, H, W, 3])."""
        from ..world.episodes import opening_frames
        c = self.config
        if c.height != c.width:
            raise ConfigError("start='world' needs a square model (the world renders square frames)")
        k, ts = c.sampler.chunk_frames, c.temporal_stride
        n = k if ts == 1 else 1 + ts * (k - 1)          # one chunk of video frames (stride-4 VAEs: 1 + 4(k-1))
        return opening_frames(prompt, seed, n, size=c.height)[0]

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"source": self.source, "trained": self.trained, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "attn_backend": self.attn_backend,
                "height": c.height, "width": c.width, "fps": c.fps,
                "chunk_frames": c.sampler.chunk_frames * c.temporal_stride,
                "steps": len(c.sampler.denoising_steps), "action_space": c.model.actions.describe()}


class Session:
    """One stream: its own cache, prompt, noise generator and decoder state."""

    def __init__(self, pipe: Pipeline, prompt: str, seed: int | None = None, start=None, start_actions=None):
        self.pipe = pipe
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.generator = torch.Generator(device=pipe.device).manual_seed(self.seed)
        self.prompt = check_prompt(prompt, pipe.config.max_prompt_chars)
        self.start_source = "noise"
        self.start_frames: np.ndarray | None = None     # uint8 [N, H, W, 3] the stream opened from
        if isinstance(start, str):
            if start != "world":
                raise ConfigError(f"start must be None, 'world' or uint8 frames [N, H, W, 3], got {start!r}")
            start, self.start_source = pipe.opening_frames(self.prompt, self.seed), "world renderer"
        elif start is not None:
            self.start_source = "frames"
        start = None if start is None else check_start_frames(pipe, start)
        self.cache = pipe.new_cache(1)
        self.cache.cross_kv = pipe.encode_prompt(self.prompt)
        self.vae_state = pipe.vae.init_state(1)
        self.latents: dict[int, torch.Tensor] = {}      # clean latents of cached frames (re-cache)
        self.frames_generated = 0
        self.chunks = 0
        if start is not None:
            self._write_start(start, start_actions)

    @torch.no_grad()
    def _write_start(self, frames: np.ndarray, actions):
        """Encode the opening frames and write them into the cache as clean context, chunk by chunk."""
        p, c = self.pipe, self.pipe.config
        k = c.sampler.chunk_frames
        video = torch.from_numpy(np.ascontiguousarray(frames)).to(p.device)
        video = (video.permute(0, 3, 1, 2).float() / 127.5 - 1.0)[None].to(p.dtype)    # [1, N, 3, H, W]
        z = p.vae.encode(video).to(p.dtype)                                             # [1, F, C, h, w]
        if z.shape[1] % k:
            raise ConfigError(f"start frames encode to {z.shape[1]} latent frames; need a whole number of "
                              f"chunks ({k} latent frames each)")
        acts = actions if isinstance(actions, (list, tuple)) else [actions] * frames.shape[0]
        if len(acts) != frames.shape[0]:
            raise ConfigError(f"start_actions: expected {frames.shape[0]} actions (one per start frame), "
                              f"got {len(acts)}")
        stride = max(1, frames.shape[0] // z.shape[1])
        for s in range(0, z.shape[1], k):
            a = p.encode_actions([acts[min((s + i) * stride, len(acts) - 1)] for i in range(k)], k)
            start = self.cache.next_frame[0]
            self.cache.begin_chunk(k)
            t = torch.full((1, k), c.sampler.context_noise, device=p.device, dtype=torch.float32)
            p.model(z[:, s:s + k], t, cache=self.cache, action=a)
            self.cache.end_chunk(z[:, s:s + k])
            for i in range(k):
                self.latents[start + i] = (z[:, s + i], None if a is None else a[:, i])
            _, self.vae_state = p.vae.decode_chunk(z[:, s:s + k], self.vae_state)
        self.start_frames = np.ascontiguousarray(frames)

    def _noise(self, shape):
        return torch.randn(shape, generator=self.generator, device=self.pipe.device, dtype=self.pipe.dtype)

    @torch.no_grad()
    def step_latents(self, action=None) -> torch.Tensor:
        """Generate the next chunk; returns its clean latents [1, k, C, h, w]."""
        p, c = self.pipe, self.pipe.config
        k = c.sampler.chunk_frames
        act = p.encode_actions(action, k)
        shape = (1, k, c.model.in_channels, c.latent_height, c.latent_width)
        start = self.cache.next_frame[0]
        x0 = generate_chunk(p.model, self.cache, p.sampler, self._noise(shape), lambda: self._noise(shape), act)
        for i in range(k):
            self.latents[start + i] = (x0[:, i], None if act is None else act[:, i])
        self.latents = kept_latents(self.latents, self.cache.cached_frames(0), c.model.frame_cond)
        self.chunks += 1
        return x0

    @torch.no_grad()
    def step(self, action=None) -> np.ndarray:
        """Generate and decode the next chunk: uint8 [T, H, W, 3]."""
        x0 = self.step_latents(action)
        frames, self.vae_state = self.pipe.vae.decode_chunk(x0, self.vae_state)
        out = self.pipe.to_uint8(frames[0])
        self.frames_generated += out.shape[0]
        return out

    @torch.no_grad()
    def set_prompt(self, prompt: str):
        """Switch prompt mid-stream with the cache's prompt-switch policy."""
        p, c = self.pipe, self.pipe.config
        self.prompt = check_prompt(prompt, c.max_prompt_chars)
        self.cache.cross_kv = p.encode_prompt(self.prompt)
        if c.cache.prompt_switch == "recache" and self.latents:
            recache(p, self.cache, self.latents)

    def close(self):
        """Free the cache now (sessions also free it when garbage-collected)."""
        self.cache = None
        self.latents = {}


def check_start_frames(pipe: Pipeline, frames) -> np.ndarray:
    """Validate opening frames: uint8 [N, H, W, 3] at the model's size, N a whole number of chunks."""
    c = pipe.config
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise ConfigError(f"start frames must be a uint8 array [N, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError(f"start frames must be uint8 [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[1:3] != (c.height, c.width):
        raise ConfigError(f"start frames are {frames.shape[2]}x{frames.shape[1]}; the model makes "
                          f"{c.width}x{c.height} (resize them first)")
    k, ts = c.sampler.chunk_frames, c.temporal_stride
    n = frames.shape[0]
    ok = n % (k * ts) == 0 if ts == 1 else (n - 1) % ts == 0 and ((n - 1) // ts + 1) % k == 0
    if n == 0 or not ok:
        want = f"a multiple of {k * ts}" if ts == 1 else f"1 + {ts} * (a multiple of {k} - 1), e.g. {1 + ts * (k - 1)}"
        raise ConfigError(f"start has {n} frames; it must be a whole number of chunks: {want}")
    return frames


def kept_latents(latents: dict[int, tuple], cached: list[int], frame_cond: str = "none") -> dict[int, tuple]:
    """The latents a re-cache needs: the cached frames' and, for ``frame_cond`` models, each
    one's predecessor (a chunk's frame conditioning is the previous chunk's last frame)."""
    keep = set(cached)
    if frame_cond != "none":
        keep |= {f - 1 for f in cached}
    return {f: v for f, v in latents.items() if f in keep}


@torch.no_grad()
def recache(pipe: Pipeline, cache: StreamCache, latents: dict[int, tuple]):
    """LongLive re-cache: recompute the cached frames' K/V under the cache's current prompt.

    The anchor region (if any) first captures the K/V from before the switch. ``frame_cond``
    models see each chunk's own conditioning frame again (zeros if it is not in ``latents``).
    """
    c = pipe.config
    k = c.sampler.chunk_frames
    cache.capture_anchor()
    frames = cache.cached_frames(0)
    next_frame = cache.next_frame[0]
    anchor = cache.slot_frame[0][cache.S:cache.S + cache.A]
    cache.slot_frame[0] = [-1] * cache.S + anchor + [-1] * cache.W
    for i in range(0, len(frames), k):
        group = frames[i:i + k]
        if len(group) != k or group != list(range(group[0], group[0] + k)):
            raise ConfigError("re-cache needs the sink and window to hold whole chunks")
        cache.begin_frames([group])
        x = torch.cat([latents[f][0][:, None] for f in group], dim=1)
        a = None if latents[group[0]][1] is None else torch.stack([latents[f][1] for f in group], dim=1)
        t = torch.full((1, k), c.sampler.context_noise, device=x.device, dtype=torch.float32)
        if cache.last_frame is not None:
            prev = latents.get(group[0] - 1)
            cache.last_frame.copy_(prev[0] if prev is not None else torch.zeros_like(cache.last_frame))
        pipe.model(x, t, cache=cache, action=a)
    if cache.last_frame is not None and next_frame - 1 in latents:
        cache.last_frame.copy_(latents[next_frame - 1][0])
    cache.next_frame[0] = next_frame
