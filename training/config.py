"""Run configs: dataclasses loaded from YAML, unknown keys rejected, values validated.

    cfg = load_run_config("training/configs/default/2_teacher.yaml", overrides={"steps": 10})

One ``RunConfig`` describes one stage (autoencoder | teacher | ode_init | consistency | dmd |
teacher_forcing | diffusion_forcing). Paths are relative to the working directory.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from ..config import PIPELINE_PRESETS, PipelineConfig, to_dict
from ..errors import ConfigError

class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` / ``2E+3`` as floats (YAML 1.1 wants a dot: ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def yaml_load(text_or_stream):
    """YAML (safe) with scientific-notation floats: training configs and ``--set`` values."""
    return yaml.load(text_or_stream, Loader=_YamlLoader)


STAGES = ("autoencoder", "teacher", "causal_init", "ode_init", "consistency", "dmd", "teacher_forcing", "diffusion_forcing")


@dataclass
class DataConfig:
    source: str = "world"          # "world" (procedural world clips) | "folder" (a user's videos)
    clips: int = 1024              # world clips to render (once, cached)
    clip_frames: int = 12          # video frames per clip (= latent frames, temporal stride 1)
    size: int = 64
    seed: int = 0
    policy: str = "random"
    warmup: int = 0                # world: policy frames run before a clip starts (0..warmup per clip)
    folder: str = ""               # source "folder": directory of videos
    captions: str = ""             # source "folder": captions JSONL
    cache_dir: str = "runs/data"   # rendered frames / latents / text embeddings cached here

    def validate(self):
        if self.source not in ("world", "folder"):
            raise ConfigError(f"data.source must be 'world' or 'folder', got {self.source!r}")
        if self.clips <= 0 or self.clip_frames <= 0 or self.size <= 0:
            raise ConfigError("data.clips, data.clip_frames and data.size must be > 0")
        if self.source == "folder" and not self.folder:
            raise ConfigError("data.source 'folder' needs data.folder")
        if self.warmup < 0:
            raise ConfigError("data.warmup must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup: int = 0
    schedule: str = "constant"     # "constant" | "cosine" (to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.1
    # per-parameter lr multipliers by name prefix, e.g. {frame_cond_embedding: 10}: a module that
    # starts at zero inside a trained model learns at the pace of the rest only with a larger lr
    lr_mult: dict = field(default_factory=dict)

    def validate(self):
        if self.lr <= 0 or len(self.betas) != 2 or self.grad_clip <= 0 or self.warmup < 0:
            raise ConfigError("optim: lr > 0, two betas, grad_clip > 0 and warmup >= 0 required")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not isinstance(self.lr_mult, dict) or any(not isinstance(k, str) or not isinstance(v, (int, float))
                                                     or v <= 0 for k, v in self.lr_mult.items()):
            raise ConfigError(f"optim.lr_mult must map parameter-name prefixes to numbers > 0, got {self.lr_mult!r}")


@dataclass
class RunConfig:
    stage: str = "teacher"
    pipeline: Any = "small-world"          # PipelineConfig preset name or dict
    out: str = "runs/default/teacher"
    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, betas=(0.0, 0.999)))
    # inputs from earlier stages (release files)
    autoencoder: str = ""                  # tiny-ae release (all DiT stages encode with it)
    teacher: str = ""                      # bidirectional teacher release
    init: str = ""                         # generator init (student stages); "teacher" = the teacher
    # flow matching / CFG
    shift: float = 5.0
    t_min: float = 20.0
    t_max: float = 980.0
    t_high_p: float = 0.0                  # P(a draw is U(t_high_min, t_max)): loss where layout is decided
    t_high_min: float = 900.0
    timestep_per: str = "chunk"            # "clip" | "chunk" | "frame" (teacher/critic noise levels)
    text_dropout: float = 0.1
    action_dropout: float = 0.1
    guidance: float = 3.0                  # real-score CFG: cond + g (cond - uncond)
    guidance_on: str = "text"              # "text" | "text+actions" (what "uncond" drops)
    teacher_attn: str = "bidirectional"    # how students' real score (and DMD critic) attend:
                                           # "bidirectional" (a clip teacher) | "block_causal"
                                           # (a causal model as the real score, e.g. an action-
                                           # sensitive causal init when the clip teacher is not)
    # students
    gen_every: int = 5                     # generator update every k critic updates (DMD)
    ema_decay: float = 0.99
    ema_start: int = 200
    ode_steps: int = 24                    # teacher Euler steps for ode_init trajectories
    ode_samples: int = 256                 # stored teacher trajectories
    context: str = "self"                  # rollout context: "self" (SF) | "clean" (TF) | "noisy" (DF)
    # clean context (world models: continue from real frames)
    clean_chunks: str = "none"             # which chunks are clean data (t = 0, no loss):
                                           # "none" | "prefix" (first L chunks) | "bernoulli" (each chunk)
    clean_p: float = 0.5                   # prefix: P(L >= 1), L uniform in 1..n-1; bernoulli: P(clean)
    start_chunks: int = 0                  # DMD family: rollouts open with this many real chunks
    init_reset: tuple = ()                 # parameter-name prefixes not taken from `init` (fresh init):
                                           # e.g. [patch_embedding, head.head] for a DiT moved to a new latent
    context_source: str = "data"           # causal_init: what the clean context chunks hold: "data"
                                           # (teacher forcing) | "self" (the student's own rollout from
                                           # max(start_chunks, 1) real chunks, as at inference; targets
                                           # stay data: flow matching against the true future)
    chain_source: str = "data"             # causal_init: what a noisy chunk's input at t_j is built from:
                                           # "data" (the true x0 noised, plain flow matching) | "self" (in a
                                           # chain_p share of batches: the model's own x0 after the sampler's
                                           # first j steps, re-noised with fresh noise to t_j, j uniform in
                                           # 1..steps-1, as at inference); targets stay data
    chain_p: float = 0.5
    adv_weight: float = 0.0                # causal_init: weight of an adversarial loss on the student's x0
                                           # (0: off). A critic of latent frame transitions conditioned on the
                                           # keys (training/discriminator.py, trained with critic_optim) judges
                                           # (frame f-1, frame f) of data against the student's; against blur
    adv_start: int = 100                   # steps the critic trains alone before the student feels it
    adv_mismatch: float = 0.5              # weight of data transitions shown with another one's keys as fakes
    adv_width: int = 64                    # critic conv width
    adv_t_max: int = 1000                  # the critic judges only frames noised to t <= this (the sampler's late steps)
    frame_cond_noise: float = 0.0          # frame_cond models: the previous frame they see is
                                           # x + s * N(0, 1), s ~ U(0, this) per clip (GameNGen's
                                           # noise augmentation: robust to its own blurred frames)
    # autoencoder
    ae_width: int = 32
    ae_latent_noise: float = 0.1           # decoder trained on latents + this * N(0, std)
    ae_train: str = "all"                  # "all" (encoder + decoder) | "decoder" (from `init`:
                                           # encoder and latent normalisation frozen, so DiTs
                                           # trained on its latents stay valid)
    ae_edge_loss: float = 0.0              # weight of the image-gradient L1 (sharper edges)
    # infrastructure
    ckpt_every: int = 100
    ckpt_minutes: float = 3.0
    sample_every: int = 0                  # 0: only at the end
    log_every: int = 10
    precision: str = "auto"                # "auto" (bf16 on GPU) | "fp32" | "bf16"
    grad_checkpointing: str = "auto"       # "auto" (on GPU) | "on" | "off"
    threads: int = 0                       # torch CPU threads (0: leave)
    progress: str = "bar"                  # "bar" | "none"

    # ------------------------------------------------------------------
    def pipeline_config(self) -> PipelineConfig:
        """``pipeline``: a preset name, a full PipelineConfig dict, or ``{preset: NAME, ...}``
        whose other keys override the preset's (nested dicts merge, e.g. ``sampler:
        {denoising_steps: [1000, 500]}``)."""
        p = self.pipeline
        if isinstance(p, str):
            return PipelineConfig.from_name(p)
        if isinstance(p, dict) and "preset" in p:
            base = to_dict(PipelineConfig.from_name(p["preset"]))
            for k, v in p.items():
                if k == "preset":
                    continue
                base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            return PipelineConfig.from_dict(base)
        return PipelineConfig.from_dict(p)

    def validate(self) -> "RunConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if isinstance(self.pipeline, str) and self.pipeline not in PIPELINE_PRESETS:
            raise ConfigError(f"unknown pipeline preset {self.pipeline!r}")
        self.pipeline_config()
        if self.steps < 0 or self.batch_size <= 0:
            raise ConfigError("steps >= 0 and batch_size > 0 required")
        if self.timestep_per not in ("clip", "chunk", "frame"):
            raise ConfigError("timestep_per must be 'clip', 'chunk' or 'frame'")
        if self.context not in ("self", "clean", "noisy"):
            raise ConfigError("context must be 'self', 'clean' or 'noisy'")
        if self.clean_chunks not in ("none", "prefix", "bernoulli"):
            raise ConfigError("clean_chunks must be 'none', 'prefix' or 'bernoulli'")
        if not 0 <= self.clean_p <= 1 or self.start_chunks < 0:
            raise ConfigError("clean_p must lie in [0, 1] and start_chunks must be >= 0")
        if self.context_source not in ("data", "self"):
            raise ConfigError(f"context_source must be 'data' or 'self', got {self.context_source!r}")
        if self.chain_source not in ("data", "self") or not 0 <= self.chain_p <= 1:
            raise ConfigError(f"chain_source must be 'data' or 'self' and chain_p in [0, 1], got "
                              f"{self.chain_source!r}, {self.chain_p!r}")
        if self.adv_weight < 0 or self.adv_start < 0 or self.adv_mismatch < 0 or self.adv_width <= 0:
            raise ConfigError("adv_weight, adv_start and adv_mismatch must be >= 0 and adv_width > 0")
        if not 0 < self.adv_t_max <= 1000:
            raise ConfigError(f"adv_t_max must be in (0, 1000], got {self.adv_t_max}")
        if self.adv_weight > 0 and self.stage != "causal_init":
            raise ConfigError(f"adv_weight is a causal_init option, not for stage {self.stage!r}")
        if self.frame_cond_noise < 0:
            raise ConfigError("frame_cond_noise must be >= 0")
        if self.guidance_on not in ("text", "text+actions"):
            raise ConfigError("guidance_on must be 'text' or 'text+actions'")
        if self.teacher_attn not in ("bidirectional", "block_causal"):
            raise ConfigError("teacher_attn must be 'bidirectional' or 'block_causal'")
        if self.precision not in ("auto", "fp32", "bf16") or self.grad_checkpointing not in ("auto", "on", "off"):
            raise ConfigError("precision: auto|fp32|bf16; grad_checkpointing: auto|on|off")
        if self.ae_train not in ("all", "decoder"):
            raise ConfigError("ae_train must be 'all' or 'decoder'")
        if self.ae_train == "decoder" and not self.init:
            raise ConfigError("ae_train: decoder fine-tunes an existing autoencoder: set init to its release file")
        if self.ae_edge_loss < 0:
            raise ConfigError("ae_edge_loss must be >= 0")
        if self.progress not in ("bar", "none"):
            raise ConfigError("progress must be 'bar' or 'none'")
        if not 0 <= self.text_dropout <= 1 or not 0 <= self.action_dropout <= 1:
            raise ConfigError("dropout probabilities must lie in [0, 1]")
        if not 0 <= self.t_min < self.t_max <= 1000:
            raise ConfigError("need 0 <= t_min < t_max <= 1000")
        if not 0.0 <= self.t_high_p <= 1.0 or not self.t_min <= self.t_high_min < self.t_max:
            raise ConfigError("need 0 <= t_high_p <= 1 and t_min <= t_high_min < t_max")
        if self.gen_every <= 0 or not 0 <= self.ema_decay < 1:
            raise ConfigError("gen_every > 0 and 0 <= ema_decay < 1 required")
        if self.stage != "autoencoder" and self.stage != "teacher" and not self.teacher:
            raise ConfigError(f"stage {self.stage!r} needs a teacher release")
        self.data.validate()
        self.optim.validate()
        self.critic_optim.validate()
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


_SUB = {"data": DataConfig, "optim": OptimConfig, "critic_optim": OptimConfig}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kw = {}
    for k, v in data.items():
        if cls is RunConfig and k in _SUB:
            v = _build(_SUB[k], v or {}, f"{where}.{k}")
        elif isinstance(v, list) and k != "pipeline":
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def run_config_from_dict(data: dict, overrides: dict | None = None) -> RunConfig:
    cfg = _build(RunConfig, dict(data or {}), "config")
    for k, v in (overrides or {}).items():
        if k.startswith("data."):
            cfg.data = dataclasses.replace(cfg.data, **{k[5:]: v})
        elif not hasattr(cfg, k):
            raise ConfigError(f"unknown override {k!r}")
        else:
            setattr(cfg, k, v)
    return cfg.validate()


def load_run_config(path: str, overrides: dict | None = None) -> RunConfig:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return run_config_from_dict(data, overrides)
