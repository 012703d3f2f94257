"""Parity: streamgen's bidirectional WanDiT forward == diffusers' WanTransformer3DModel (fp32).

Same weights (converted by streamgen.io.convert), same inputs, max abs error <= 1e-5. diffusers
takes one timestep per batch element, so the uniform-t case is compared directly; the
per-frame case uses diffusers' per-token timestep input ([B, L], Wan2.2-style) expanded from
streamgen's per-frame timesteps.
"""
from __future__ import annotations

import pytest
import torch

from streamgen.config import ModelConfig
from streamgen.io.convert import diffusers_to_wan, model_to_diffusers_config, wan_to_diffusers
from streamgen.models.model import WanDiT

diffusers = pytest.importorskip("diffusers")

CFG = ModelConfig(dim=96, ffn_dim=160, num_heads=2, num_layers=2, in_channels=4, out_channels=4,
                  text_dim=40, freq_dim=32, text_len=12)
TOL = 1e-5


def _pair(seed=0, source="streamgen"):
    torch.manual_seed(seed)
    ours = WanDiT(CFG).eval()
    ref = diffusers.WanTransformer3DModel(**model_to_diffusers_config(CFG)).eval()
    if source == "streamgen":
        with torch.no_grad():
            for p in ours.parameters():        # norms and modulation too, not left at their init
                p.normal_(0, 0.1)
        ref.load_state_dict(wan_to_diffusers(ours.state_dict()), strict=True)
    else:
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0, 0.1)
        ours.load_state_dict(diffusers_to_wan(ref.state_dict()), strict=True)
    return ours, ref


def _inputs(B=2, F=3, H=6, W=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, CFG.in_channels, H, W, generator=g)              # [B, F, C, H, W]
    text = torch.randn(B, CFG.text_len, CFG.text_dim, generator=g)
    return x, text


@pytest.mark.parametrize("source", ["streamgen", "diffusers"])
@pytest.mark.parametrize("t", [0.0, 1.0, 437.5, 999.0, 1000.0])
def test_uniform_t_matches_diffusers(source, t):
    ours, ref = _pair(source=source)
    x, text = _inputs()
    tt = torch.full((x.shape[0],), t)
    with torch.no_grad():
        a = ours(x, tt, text, attn_mode="bidirectional")                       # [B, F, C, H, W]
        b = ref(x.transpose(1, 2), tt, text, return_dict=False)[0].transpose(1, 2)
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g} at t={t}"
    assert a.abs().max() > 0.1                                                # not trivially zero


def test_per_frame_t_matches_diffusers_per_token_t():
    ours, ref = _pair(seed=3)
    x, text = _inputs(B=1, F=4)
    t = torch.tensor([[1000.0, 750.0, 500.0, 0.0]])                           # [B, F]
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    with torch.no_grad():
        a = ours(x, t, text)
        b = ref(x.transpose(1, 2), t.repeat_interleave(h * w, dim=1), text, return_dict=False)[0].transpose(1, 2)
    err = (a - b).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g}"


def test_parity_detects_a_wrong_mapping():
    """The comparison can fail: swapping two tensors' names breaks it."""
    ours, ref = _pair(seed=5)
    sd = wan_to_diffusers(ours.state_dict())
    sd["blocks.0.norm2.weight"], sd["blocks.0.norm2.bias"] = sd["blocks.0.norm2.weight"] * 0 + 1, sd["blocks.0.norm2.bias"] * 0
    ref.load_state_dict(sd)
    x, text = _inputs()
    tt = torch.full((2,), 500.0)
    with torch.no_grad():
        err = (ours(x, tt, text) - ref(x.transpose(1, 2), tt, text, return_dict=False)[0].transpose(1, 2)).abs().max()
    assert err > 1e-3
