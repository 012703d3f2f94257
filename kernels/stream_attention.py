"""Streaming attention (inference): a chunk's queries against a ring-buffer KV cache.

The cache keeps a fixed layout ``[sink | anchor | ring]`` of S slots per batch row; which
slots hold visible keys is given by ``key_valid`` [B, S] (any order: the ring may have
wrapped). Softmax does not depend on key order, so the kernel walks the whole buffer tile
by tile, skips tiles with no valid slot and masks the invalid slots of the others: no
gather, no copy, no rotated copy of the keys.

Optional RoPE inside the kernel (Wan's interleaved pairs (2i, 2i+1)):
- ``k_rope`` = (cos, sin) [B, S, D/2] fp32 rotates cached keys by their slot's position
  (caches that store keys without RoPE);
- ``q_rope`` = (cos, sin) [B, Lq, D/2] rotates the queries the same way.
The rotation runs in fp32 and is rounded to the I/O dtype before the tile product, exactly
like ``streamgen.models.rope.apply_rope`` followed by attention.

Shapes: q [B, Lq, H, D], k/v [B, S, H, D] (last dim contiguous), out [B, Lq, H, D].
Lq, S need not be multiples of the tiles; Lq != S. fp32/fp16/bf16 I/O, fp32 accumulation.

    python -m streamgen.kernels.stream_attention      # self-test (interpreter on CPU)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, dot_f32, head_block, interpreting, runnable


@triton.jit
def _rope_tile(x, row_ptrs, cos_ptrs, sin_ptrs, offs_d, mask):
    """Rotate a loaded tile x [R, BLOCK_D] by interleaved pairs; returns fp32.

    row_ptrs/cos_ptrs/sin_ptrs: [R, 1] row base pointers; channel d pairs with d ^ 1 and
    uses angle d // 2: out[2i] = x[2i] c - x[2i+1] s, out[2i+1] = x[2i+1] c + x[2i] s.
    """
    partner = tl.load(row_ptrs + (offs_d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptrs + (offs_d // 2)[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptrs + (offs_d // 2)[None, :], mask=mask, other=0.0)
    sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    return x.to(tl.float32) * c + sign[None, :] * partner * s


@triton.jit
def _stream_attn_kernel(
    Q, K, V, Valid, KCos, KSin, QCos, QSin, Out,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_valid_b,
    stride_kcb, stride_kcn,
    stride_qcb, stride_qcm,
    H, Lq, S, D, qk_scale,
    HAS_VALID: tl.constexpr, K_ROPE: tl.constexpr, Q_ROPE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_M), B * H); one program = BLOCK_M queries of one (b, h)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # int64: batch offsets can pass 2**31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)                                     # [BLOCK_D]
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm   # [BLOCK_M, 1]
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0)     # [BLOCK_M, BLOCK_D]
    if Q_ROPE:
        qc_rows = b * stride_qcb + offs_m[:, None] * stride_qcm
        q = _rope_tile(q, q_rows, QCos + qc_rows, QSin + qc_rows, offs_d, q_mask).to(q.dtype)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)   # finite start: no inf - inf anywhere
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)                       # [BLOCK_N] slots
        n_ok = offs_n < S
        if HAS_VALID:
            valid = tl.load(Valid + b * stride_valid_b + offs_n, mask=n_ok, other=0) != 0
        else:
            valid = n_ok
        if tl.max(valid.to(tl.int32), 0) > 0:                          # skip empty tiles
            kv_mask = valid[:, None] & d_ok[None, :]
            k_rows = k_base + offs_n[:, None] * stride_kn              # [BLOCK_N, 1]
            k = tl.load(k_rows + offs_d[None, :], mask=kv_mask, other=0.0)   # [BLOCK_N, BLOCK_D]
            if K_ROPE:
                kc_rows = b * stride_kcb + offs_n[:, None] * stride_kcn
                k = _rope_tile(k, k_rows, KCos + kc_rows, KSin + kc_rows, offs_d, kv_mask).to(k.dtype)
            if DOT_F32:
                qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))                            # [BLOCK_M, BLOCK_N] fp32
            qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None]
            if DOT_F32:
                acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                  # no valid key -> 0
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)


def _gpu_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                 (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 8, 2)]]


_stream_attn_autotuned = triton.autotune(_gpu_configs(), key=["Lq", "S", "BLOCK_D", "K_ROPE", "Q_ROPE"])(
    _stream_attn_kernel)

INTERPRETER_BLOCK = (32, 32)   # (BLOCK_M, BLOCK_N) used under TRITON_INTERPRET


def _rope_ok(rope, B, L, D, dev):
    if rope is None:
        return True
    cos, sin = rope
    return all(t.shape == (B, L, D // 2) and t.dtype == torch.float32 and t.device == dev
               and t.stride(-1) == 1 and t.stride(1) == cos.stride(1) and t.stride(0) == cos.stride(0)
               for t in (cos, sin))


def supports(q, k_cache, v_cache, key_valid=None, k_rope=None, q_rope=None) -> bool:
    """Whether :func:`stream_attention` runs this call (False: it would return None)."""
    B, Lq, H, D = q.shape
    S = k_cache.shape[1]
    dev = q.device
    if (q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype
            or k_cache.shape != (B, S, H, D) or v_cache.shape != (B, S, H, D) or D % 2
            or not runnable(q, k_cache, v_cache)
            or any(t.stride(-1) != 1 for t in (q, k_cache, v_cache))
            or not _rope_ok(k_rope, B, S, D, dev) or not _rope_ok(q_rope, B, Lq, D, dev)):
        return False
    return key_valid is None or (key_valid.shape == (B, S) and key_valid.dtype == torch.bool
                                 and key_valid.device == dev)


def stream_attention(q, k_cache, v_cache, key_valid=None, k_rope=None, q_rope=None,
                     block: tuple[int, int] | None = None):
    """Chunk queries q [B, Lq, H, D] against cache k/v [B, S, H, D] -> [B, Lq, H, D].

    key_valid: [B, S] bool (None = every slot visible). k_rope/q_rope: optional (cos, sin)
    fp32 [B, S, D/2] / [B, Lq, D/2]. block: (BLOCK_M, BLOCK_N) to pin the tiles (tests);
    default autotunes on a GPU and uses ``INTERPRETER_BLOCK`` in the interpreter.
    Returns None when the call is outside what the kernel supports (:func:`supports`).
    """
    B, Lq, H, D = q.shape
    S = k_cache.shape[1]
    dev = q.device
    if not supports(q, k_cache, v_cache, key_valid, k_rope, q_rope):
        return None
    if key_valid is not None:
        valid = key_valid if key_valid.stride(-1) == 1 else key_valid.contiguous()
        valid = valid.view(torch.uint8)
    else:
        valid = torch.empty(1, 1, dtype=torch.uint8, device=dev)
    out = torch.empty(B, Lq, H, D, device=dev, dtype=q.dtype)
    if B * H == 0 or Lq == 0:
        return out
    dummy = torch.empty(1, 1, 1, dtype=torch.float32, device=dev)
    kc, ks = k_rope if k_rope is not None else (dummy, dummy)
    qc, qs = q_rope if q_rope is not None else (dummy, dummy)
    args = (q, k_cache, v_cache, valid, kc, ks, qc, qs, out,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            valid.stride(0), kc.stride(0), kc.stride(1), qc.stride(0), qc.stride(1),
            H, Lq, S, D, (1.0 / math.sqrt(D)) * 1.4426950408889634)
    meta = dict(HAS_VALID=key_valid is not None, K_ROPE=k_rope is not None, Q_ROPE=q_rope is not None,
                DOT_F32=dot_f32(q.dtype), BLOCK_D=head_block(D))
    if block is None and not interpreting():
        grid = lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H)        # noqa: E731
        _stream_attn_autotuned[grid](*args, **meta)
    else:
        bm, bn = block or INTERPRETER_BLOCK
        _stream_attn_kernel[(triton.cdiv(Lq, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    return out


def reference(q, k_cache, v_cache, key_valid=None, k_rope=None, q_rope=None, dtype=None):
    """Plain PyTorch: rotate (rounded to the I/O dtype, like the engine), mask, softmax.

    dtype: compute dtype of the product (default fp32 -> the accuracy reference); pass the
    I/O dtype to get "PyTorch in the same dtype" for the flash-attention error rule.
    """
    from streamgen.models.rope import apply_rope
    k = k_cache if k_rope is None else apply_rope(k_cache, *k_rope)
    q = q if q_rope is None else apply_rope(q, *q_rope)
    dt = dtype or torch.float32
    qf, kf, vf = (t.to(dt).transpose(1, 2) for t in (q, k, v_cache))   # [B, H, L, D]
    s = (qf @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s.to(torch.promote_types(dt, torch.float32)), dim=-1).to(dt)
    return (p @ vf).transpose(1, 2)


def _test(dtype=torch.float16, B=2, Lq=40, S=72, H=2, D=32):
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(dev, dtype) for n in (Lq, S, S))
    valid = torch.rand(B, S, generator=g).to(dev) > 0.3
    ang = torch.rand(B, S, D // 2, generator=g).to(dev) * 6.0
    out = stream_attention(q, k, v, valid, k_rope=(ang.cos(), ang.sin()))
    ref = reference(q, k, v, valid, k_rope=(ang.cos(), ang.sin()))
    err = (out.float() - ref).abs().max().item()
    print(f"stream_attention {dtype} max|err| = {err:.2e}")
    return err


if __name__ == "__main__":
    _test()
