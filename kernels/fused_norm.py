"""Fused elementwise kernels of the Wan block (one row of ``dim`` channels per program).

1. ``rmsnorm_rope``: q/k RMSNorm (over all heads, Wan's ``norm_q``/``norm_k``) fused with
   Wan's interleaved 3D RoPE: x [B, L, dim] -> [B, L, H, D] rotated, one read, one write.
2. ``layernorm_modulate``: LayerNorm without affine (Wan's ``norm1``/``norm2``) fused with
   the per-frame adaLN modulation ``LN(x) * (1 + scale) + shift``; x [B, L, dim],
   shift/scale [B, F, dim] (frame f covers tokens f*T .. f*T+T-1, T = L // F).

Statistics and rotation in fp32; the normalised value is rounded to the I/O dtype before
the weight/rotation exactly where the PyTorch modules round it.

    python -m streamgen.kernels.fused_norm            # self-test (interpreter on CPU)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, next_pow2, runnable


@triton.jit
def _rmsnorm_rope_kernel(X, Wt, Cos, Sin, Out,
                         stride_xr, stride_cb, stride_cl,
                         L, DIM, D, eps,
                         BLOCK: tl.constexpr):
    # grid: (B * L,); row r = (b, l); channel c = h * D + d pairs with c ^ 1, angle (c % D) // 2
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    l = r % L
    c = tl.arange(0, BLOCK)
    ok = c < DIM
    x = tl.load(X + r * stride_xr + c, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(X + r * stride_xr + (c ^ 1), mask=ok, other=0.0).to(tl.float32)
    w = tl.load(Wt + c, mask=ok, other=0.0).to(tl.float32)
    wp = tl.load(Wt + (c ^ 1), mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / DIM + eps)
    y = (x * inv).to(X.dtype.element_ty).to(tl.float32) * w           # RMSNorm, rounded like torch
    yp = (xp * inv).to(X.dtype.element_ty).to(tl.float32) * wp
    ang = (c % D) // 2
    cs = tl.load(Cos + b * stride_cb + l * stride_cl + ang, mask=ok, other=0.0)
    sn = tl.load(Sin + b * stride_cb + l * stride_cl + ang, mask=ok, other=0.0)
    y = y.to(X.dtype.element_ty).to(tl.float32)
    yp = yp.to(X.dtype.element_ty).to(tl.float32)
    out = y * cs + tl.where(c % 2 == 0, -1.0, 1.0) * yp * sn
    tl.store(Out + r * DIM + c, out.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _layernorm_modulate_kernel(X, Shift, Scale, Out,
                               stride_xr, stride_sb, stride_sf, stride_cb, stride_cf,
                               L, T, DIM, eps,
                               BLOCK: tl.constexpr):
    # grid: (B * L,); row r = (b, l) uses modulation row (b, l // T)
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    f = (r % L) // T
    c = tl.arange(0, BLOCK)
    ok = c < DIM
    x = tl.load(X + r * stride_xr + c, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / DIM
    xc = tl.where(ok, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / DIM
    y = (xc / tl.sqrt(var + eps)).to(X.dtype.element_ty).to(tl.float32)   # LN rounded like torch
    shift = tl.load(Shift + b * stride_sb + f * stride_sf + c, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(Scale + b * stride_cb + f * stride_cf + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + r * DIM + c, (y * (1.0 + scale) + shift).to(Out.dtype.element_ty), mask=ok)


def rmsnorm_rope(x, weight, cos, sin, heads: int, eps: float = 1e-6):
    """RMSNorm(x) * weight, then interleaved RoPE per head: x [B, L, dim] -> [B, L, H, D].

    cos/sin: fp32 [B, L, D/2]. Returns None when unsupported (caller uses PyTorch).
    """
    B, L, dim = x.shape
    D = dim // heads
    if (x.dtype not in SUPPORTED_DTYPES or dim % heads or D % 2 or x.stride(-1) != 1
            or x.stride(0) != L * x.stride(1) or weight.shape != (dim,) or not runnable(x, weight, cos, sin)
            or any(t.shape != (B, L, D // 2) or t.dtype != torch.float32 or t.stride(-1) != 1
                   or t.stride() != cos.stride() for t in (cos, sin))):
        return None
    out = torch.empty(B, L, heads, D, device=x.device, dtype=x.dtype)
    if B * L:
        _rmsnorm_rope_kernel[(B * L,)](x, weight, cos, sin, out, x.stride(1), cos.stride(0), cos.stride(1),
                                       L, dim, D, eps, BLOCK=max(16, next_pow2(dim)))
    return out


def layernorm_modulate(x, shift, scale, eps: float = 1e-6):
    """LayerNorm(x) * (1 + scale) + shift per frame: x [B, L, dim], shift/scale [B, F, dim].

    Also accepts the model's [B, F, 1, dim] chunks. Output in x's dtype. None if unsupported.
    """
    if shift.dim() == 4:
        shift, scale = shift[:, :, 0], scale[:, :, 0]
    B, L, dim = x.shape
    F = shift.shape[1]
    if (x.dtype not in SUPPORTED_DTYPES or F == 0 or L % F or x.stride(-1) != 1
            or x.stride(0) != L * x.stride(1) or shift.shape != (B, F, dim) or scale.shape != (B, F, dim)
            or shift.stride(-1) != 1 or scale.stride(-1) != 1 or not runnable(x, shift, scale)):
        return None
    out = torch.empty(B, L, dim, device=x.device, dtype=x.dtype)
    if B * L:
        _layernorm_modulate_kernel[(B * L,)](x, shift, scale, out, x.stride(1), shift.stride(0), shift.stride(1),
                                             scale.stride(0), scale.stride(1), L, L // F, dim, eps,
                                             BLOCK=max(16, next_pow2(dim)))
    return out


def rmsnorm_rope_reference(x, weight, cos, sin, heads: int, eps: float = 1e-6, dtype=None):
    """The model's path: RMSNorm module math, view to heads, ``apply_rope`` (in ``dtype``)."""
    from streamgen.models.rope import apply_rope
    dt = dtype or torch.float32
    xd = x.to(dt)
    xf = xd.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt) * weight.to(dt)
    return apply_rope(y.view(*x.shape[:2], heads, -1), cos, sin)


def layernorm_modulate_reference(x, shift, scale, eps: float = 1e-6, dtype=None):
    """The model's path: fp32 LayerNorm rounded to ``dtype``, per-frame modulation."""
    if shift.dim() == 4:
        shift, scale = shift[:, :, 0], scale[:, :, 0]
    dt = dtype or torch.float32
    B, L, dim = x.shape
    F = shift.shape[1]
    y = torch.nn.functional.layer_norm(x.to(dt).float(), (dim,), eps=eps).to(dt)
    y = y.view(B, F, L // F, dim) * (1 + scale.to(dt)[:, :, None]) + shift.to(dt)[:, :, None]
    return y.view(B, L, dim)


def _test(dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    B, F, T, H, D = 2, 3, 5, 2, 32
    x = torch.randn(B, F * T, H * D, generator=g).to(dtype)
    w = torch.rand(H * D, generator=g) + 0.5
    ang = torch.rand(B, F * T, D // 2, generator=g) * 6
    e1 = (rmsnorm_rope(x, w, ang.cos(), ang.sin(), H).float()
          - rmsnorm_rope_reference(x, w, ang.cos(), ang.sin(), H)).abs().max().item()
    sh, sc = torch.randn(2, B, F, H * D, generator=g)
    e2 = (layernorm_modulate(x, sh, sc).float() - layernorm_modulate_reference(x, sh, sc)).abs().max().item()
    print(f"rmsnorm_rope {dtype} max|err| {e1:.2e}; layernorm_modulate {e2:.2e}")


if __name__ == "__main__":
    _test()
