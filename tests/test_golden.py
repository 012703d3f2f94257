"""Reproduce Self-Forcing's own outputs (tests/data/golden = shared/golden) with the absolute-RoPE cache policy."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from streamgen.engine.cache import StreamCache
from streamgen.io.checkpoint import check_and_load, read_weights, unwrap_state_dict
from streamgen.config import CacheConfig, ModelConfig, SamplerConfig
from streamgen.models.model import WanDiT
from streamgen.engine.sampling import FewStepSampler
from streamgen.engine.chunk_step import rollout

# STREAMGEN_GOLDEN first (CI's shared copy), else the copy kept in the repo (tests/data/golden,
# 1.3 MB: the same files as shared/golden), so a fresh clone runs these too.
GOLDEN = os.environ.get("STREAMGEN_GOLDEN", os.path.join(os.path.dirname(__file__), "data", "golden"))
CASES = ["global_chunk3", "rolling_sink_chunk3"]


def load_case(name):
    d = os.path.join(GOLDEN, name)
    assert os.path.isdir(d), f"golden vectors not found at {d} (STREAMGEN_GOLDEN or tests/data/golden)"
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    return d, cfg


@pytest.mark.parametrize("name", CASES)
def test_golden(name):
    d, cfg = load_case(name)
    mc = ModelConfig.from_dict(cfg["model"])
    model = WanDiT(mc).eval()
    raw, _ = read_weights(os.path.join(d, "weights.pt"))       # torch.load(weights_only=True)
    check_and_load(model, unwrap_state_dict(raw))
    inp = load_file(os.path.join(d, "inputs.safetensors"))
    expected = load_file(os.path.join(d, "expected.safetensors"))["latents"]
    c, s, lat = cfg["cache"], cfg["sampler"], cfg["latent"]
    local = c["local_attn_frames"]
    cache_cfg = CacheConfig(sink_frames=c["sink_frames"], rope="absolute",
                            window_frames=-1 if local == -1 else local - c["sink_frames"],
                            max_frames=lat["frames"])
    sampler = FewStepSampler(SamplerConfig(denoising_steps=tuple(s["denoising_step_list"]),
                                           warp=s["warp_denoising_step"], shift=s["timestep_shift"],
                                           chunk_frames=s["frames_per_chunk"],
                                           context_noise=s["context_noise"]))
    assert sampler.timesteps == pytest.approx(s["warped_timesteps"], abs=1e-4)
    k, B = s["frames_per_chunk"], lat["batch"]
    draws = iter([inp[n] for n in sorted(n for n in inp if n.startswith("renoise_"))])
    cache = StreamCache(mc, cache_cfg, B, mc.tokens_per_frame(lat["height"], lat["width"]), k)
    with torch.no_grad():
        cache.cross_kv = model.cross_kv(inp["prompt_embeds"])
        out = rollout(model, cache, sampler, inp["noise"], lambda: next(draws).unflatten(0, (B, k)))
    assert next(draws, None) is None, "every recorded noise draw must be consumed"
    err = (out - expected).abs().max().item()
    assert err <= 1e-5, f"{name}: max abs error {err}"
