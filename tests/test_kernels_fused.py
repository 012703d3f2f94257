"""Fused RMSNorm + interleaved RoPE and LayerNorm + adaLN modulate vs the model's modules.

fp16 acceptance as flash-attention's tests (kernel error vs fp64 <= 2x torch fp16 error +
floor); fp32 must match the model's own modules to ~1e-6.
"""
import pytest
import torch

from streamgen.models.attention import resolve_backend
from streamgen.config import ModelConfig
from streamgen.models.model import LayerNorm, RMSNorm
from streamgen.models.rope import RopeTables, apply_rope

pytestmark = pytest.mark.skipif(resolve_backend("triton", "cpu") != "triton" and not torch.cuda.is_available(),
                                reason="triton cannot run here (no GPU and no TRITON_INTERPRET=1)")

from streamgen.kernels import fused_norm as fn  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 3, 5, 2, 32), (1, 2, 7, 3, 24)]      # B, F, T, H, D (dim 64; dim 72 = not a power of 2)


def _rule(got, truth, same, floor):
    err = (got.double() - truth).abs().max().item()
    err_pt = (same.double() - truth).abs().max().item()
    assert err <= 2 * err_pt + floor, (err, err_pt)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_rope_equals_model_path_fp32(shape):
    B, F, T, H, D = shape
    cfg = ModelConfig(dim=H * D, num_heads=H, ffn_dim=32, num_layers=1, text_dim=8, freq_dim=8, text_len=4)
    torch.manual_seed(0)
    norm = RMSNorm(H * D, cfg.eps).to(DEV)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    cos, sin = RopeTables(cfg).grid(torch.tensor([[3, 9, 4]] * B)[:, :F].to(DEV), 1, T)   # [B, F*T, D/2]
    x = torch.randn(B, F * T, H * D, device=DEV)
    ref = apply_rope(norm(x).view(B, F * T, H, D), cos, sin)
    out = fn.rmsnorm_rope(x, norm.weight, cos, sin, H, cfg.eps)
    torch.testing.assert_close(out, ref.detach(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_rope_fp16(shape):
    B, F, T, H, D = shape
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(B, F * T, H * D, generator=g) * 3).to(DEV, torch.float16)
    w = (torch.rand(H * D, generator=g) + 0.5).to(DEV)
    ang = torch.rand(B, F * T, D // 2, generator=g).to(DEV) * 30
    cos, sin = ang.cos(), ang.sin()
    out = fn.rmsnorm_rope(x, w, cos, sin, H)
    assert out.dtype == torch.float16 and out.shape == (B, F * T, H, D)
    _rule(out, fn.rmsnorm_rope_reference(x, w, cos, sin, H, dtype=torch.float64),
          fn.rmsnorm_rope_reference(x, w, cos, sin, H, dtype=torch.float16), 1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_modulate_equals_model_path_fp32(shape):
    B, F, T, H, D = shape
    dim = H * D
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, F * T, dim, generator=g).to(DEV) * 2 + 0.5
    mod = torch.randn(B, F, 6, 1, dim, generator=g).to(DEV)       # like Block's (modulation + e)
    shift, scale = mod[:, :, 0], mod[:, :, 1]                      # [B, F, 1, dim], strided views
    norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
    ref = (norm(x).view(B, F, T, dim) * (1 + scale) + shift).view(B, F * T, dim)
    out = fn.layernorm_modulate(x, shift, scale, eps=1e-6)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_modulate_fp16(shape):
    B, F, T, H, D = shape
    dim = H * D
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(B, F * T, dim, generator=g) * 4 + 1).to(DEV, torch.float16)
    shift, scale = (torch.randn(B, F, dim, generator=g).to(DEV, torch.float16) for _ in range(2))
    out = fn.layernorm_modulate(x, shift, scale)
    assert out.dtype == torch.float16
    _rule(out, fn.layernorm_modulate_reference(x, shift, scale, dtype=torch.float64),
          fn.layernorm_modulate_reference(x, shift, scale, dtype=torch.float16), 1e-4)


def test_unsupported_returns_none():
    x = torch.randn(1, 6, 64, device=DEV)
    assert fn.layernorm_modulate(x, torch.zeros(1, 4, 64, device=DEV), torch.zeros(1, 4, 64, device=DEV)) is None
    assert fn.rmsnorm_rope(x, torch.ones(64, device=DEV), torch.ones(1, 6, 16, device=DEV),
                           torch.ones(1, 6, 16, device=DEV), heads=3) is None       # 64 % 3 != 0
