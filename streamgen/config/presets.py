"""The preset tables: named model and pipeline configs, read-only (gpt-fast's ``transformer_configs``).

One literal table each, built once at import from data only (this module imports nothing of
streamgen), deeply read-only (mappings are ``MappingProxyType``, lists tuples), so a preset
never depends on import order or on what some other module added. ``PIPELINE_PRESETS`` holds
the base presets and the per-family presets of Wan2.1-T2V-1.3B causal students
(``FAMILY_PRESETS``; sources and confidence in ``streamgen.io.families.FAMILY_NOTES``).

    PipelineConfig.from_name("longlive")        # streamgen.config reads these tables
    thaw(PIPELINE_PRESETS["tiny"])              # a plain, mutable deep copy (dicts, lists)
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

WASD = ("W", "A", "S", "D")
SF_STEPS = (1000, 750, 500, 250)


def freeze(obj):
    """A deeply read-only copy: dicts -> MappingProxyType, lists -> tuples."""
    if isinstance(obj, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return tuple(freeze(v) for v in obj)
    return obj


def thaw(obj):
    """A plain deep copy of a (frozen) preset: mappings -> dicts, tuples -> lists (JSON-ready)."""
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [thaw(v) for v in obj]
    return obj


_WAN_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, text_len=512)

_MODELS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": _WAN_1_3B,
    "wan2.1-t2v-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=16,
                           out_channels=16, text_dim=4096, freq_dim=256, text_len=512),
    # Tiny CPU presets. `tiny` matches the golden vectors' size.
    "tiny": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, text_len=16),
    "tiny-world": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=4,
                       out_channels=4, text_dim=32, freq_dim=32, text_len=16,
                       actions=dict(keys=WASD, mouse=True)),
    # The default world model of releases 1-2 (64x64 video, 8x8x8 latents).
    "small-world": dict(dim=128, ffn_dim=384, num_heads=2, num_layers=4, in_channels=8,
                        out_channels=8, text_dim=384, freq_dim=64, text_len=16,
                        actions=dict(keys=WASD, mouse=True), pos_embed="learned", pos_grid=16),
    # The default world model of releases 3-5 (wider and deeper; same latents).
    "world-64": dict(dim=192, ffn_dim=576, num_heads=3, num_layers=5, in_channels=8,
                     out_channels=8, text_dim=384, freq_dim=64, text_len=16,
                     actions=dict(keys=WASD, mouse=True), pos_embed="learned", pos_grid=16),
    # The shipped default world model from release 6 on: the same DiT on 16x16x4 latents (tiny-ae
    # stride 4), patches of 4x4 latents, so still 16 tokens per frame of 16x16 px and the same speed.
    "world-64-s4": dict(dim=192, ffn_dim=576, num_heads=3, num_layers=5, in_channels=4,
                        out_channels=4, patch_size=(1, 4, 4), text_dim=384, freq_dim=64, text_len=16,
                        actions=dict(keys=WASD, mouse=True), pos_embed="learned", pos_grid=16),
}

_BASE: dict[str, dict[str, Any]] = {
    # Self-Forcing's released setting: global causal attention over 21 latent frames.
    "wan2.1-t2v-1.3b": dict(model=_MODELS["wan2.1-t2v-1.3b"], vae="wan", text_encoder="umt5",
                            cache=dict(window_frames=-1, max_frames=21)),
    "wan2.1-t2v-14b": dict(model=_MODELS["wan2.1-t2v-14b"], vae="wan", text_encoder="umt5",
                           cache=dict(window_frames=-1, max_frames=21)),
    "tiny": dict(model=_MODELS["tiny"], height=64, width=64, temporal_stride=1,
                 cache=dict(sink_frames=3, window_frames=6, rope="relative")),
    "tiny-world": dict(model=_MODELS["tiny-world"], height=64, width=64, temporal_stride=1,
                       cache=dict(sink_frames=3, window_frames=6, rope="relative",
                                  prompt_switch="recache")),
    "small-world": dict(model=_MODELS["small-world"], height=64, width=64, temporal_stride=1,
                        cache=dict(sink_frames=3, window_frames=6, rope="relative"),
                        vae="tiny-ae", text_encoder="minilm"),
    "world-64": dict(model=_MODELS["world-64"], height=64, width=64, temporal_stride=1,
                     cache=dict(sink_frames=3, window_frames=9, rope="relative"),
                     vae="tiny-ae", text_encoder="minilm"),
    "world-64-s4": dict(model=_MODELS["world-64-s4"], height=64, width=64, temporal_stride=1, spatial_stride=4,
                        cache=dict(sink_frames=3, window_frames=9, rope="relative"),
                        vae="tiny-ae", text_encoder="minilm"),
}


def _family(cache: dict, steps=SF_STEPS, chunk: int = 3, warp: bool = True, shift: float = 5.0) -> dict[str, Any]:
    return dict(model=_WAN_1_3B, vae="wan", text_encoder="umt5", height=480, width=832, fps=16,
                sampler=dict(denoising_steps=steps, warp=warp, shift=shift, chunk_frames=chunk, context_noise=0.0),
                cache=cache)


# Each family's checkpoint runs with the chunk size, steps, sink/window and RoPE policy it was
# trained with (streamgen's ``window_frames`` excludes the sink).
_FAMILIES: dict[str, dict[str, Any]] = {
    # Self-Forcing (self_forcing_dmd.yaml): 3-frame chunks, global causal attention over the
    # 21 trained latent frames, absolute RoPE, 4 warped steps, shift 5.
    "self-forcing": _family(dict(window_frames=-1, max_frames=21, rope="absolute", prompt_switch="reset")),
    # CausVid: chunk-wise (3) causal student, global attention, 3-step DMD (1000, 757, 522).
    "causvid": _family(dict(window_frames=-1, max_frames=21, rope="absolute", prompt_switch="reset"),
                       steps=(1000, 757, 522), warp=False),
    # LongLive: frame sink = first chunk (3 frames) + short window; KV re-cache on prompt switch.
    "longlive": _family(dict(sink="frame", sink_frames=3, window_frames=9, rope="absolute",
                             prompt_switch="recache")),
    # Reward Forcing: EMA sink (evicted frames blended into the sink), relative RoPE.
    "reward-forcing": _family(dict(sink="ema", sink_frames=3, window_frames=9, rope="relative",
                                   ema_alpha=0.999, prompt_switch="reset")),
    # Anchor Forcing: sink + an anchor region captured at prompt switches, then re-cache.
    "anchor-forcing": _family(dict(sink="frame", sink_frames=3, anchor_frames=3, window_frames=9,
                                   rope="relative", prompt_switch="recache")),
    # Rolling Forcing: attention sink + rolling window with positions re-based (relative).
    "rolling-forcing": _family(dict(sink="frame", sink_frames=3, window_frames=12, rope="relative",
                                    prompt_switch="reset")),
    # Causal Forcing: frame-wise (1-frame chunks) causal student, global attention.
    "causal-forcing": _family(dict(window_frames=-1, max_frames=21, rope="absolute", prompt_switch="reset"),
                              chunk=1),
}

if set(_BASE) & set(_FAMILIES):                                  # pragma: no cover
    raise ValueError(f"family presets shadow base presets: {sorted(set(_BASE) & set(_FAMILIES))}")

MODEL_PRESETS: Mapping[str, Mapping[str, Any]] = freeze(_MODELS)
FAMILY_PRESETS: Mapping[str, Mapping[str, Any]] = freeze(_FAMILIES)
PIPELINE_PRESETS: Mapping[str, Mapping[str, Any]] = freeze({**_BASE, **_FAMILIES})
