"""Block-causal attention (training): forward and backward, masked tiles skipped.

Frame-structured mask over L = frames * T tokens (T tokens per frame): a query of frame
``fq`` sees key frame ``fk`` iff ``fk < end(fq)`` with ``end(fq) = (fq // C + 1) * C`` (the
end of its chunk of C frames) and, with a window of W frames, also ``fk >= end(fq) - W``
or ``fk < sink``. The mask is never materialised: each program derives from its tile's
frame range which key (or query) tiles can be visible and loops only over those (a sink
range plus a window range); inside visited tiles the mask is computed from indices.

``mode="full"`` is plain unmasked attention (Lq != Lk allowed, e.g. cross-attention).

Shapes: q [B, Lq, H, D], k/v [B, Lk, H, D], out [B, Lq, H, D]; forward saves the base-2
log-sum-exp [B, H, Lq] fp32 for the backward (FlashAttention-2 style: dK/dV per key tile,
dQ per query tile, delta = rowsum(dO * O) computed in torch).

    python -m streamgen.kernels.block_causal          # self-test (interpreter on CPU)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from streamgen.models.masks import FrameMask as BlockCausal   # the mask structure (a torch-only leaf module)

from ._common import SUPPORTED_DTYPES, dot_f32, head_block, interpreting, runnable

LOG2E = 1.4426950408889634


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, T, C, SINK, W, CAUSAL: tl.constexpr):
    ok = (offs_m < Lq)[:, None] & (offs_n < Lk)[None, :]
    if CAUSAL:
        fk = (offs_n // T)[None, :]
        end = ((offs_m // T) // C + 1) * C
        end = end[:, None]
        ok = ok & (fk < end) & ((fk >= end - W) | (fk < SINK))
    return ok


@triton.jit
def _key_range(m_lo, m_hi, Lk, T, C, SINK, W, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile ranges that queries [m_lo, m_hi] can see: [0, sink_hi) and [lo, hi)."""
    if CAUSAL:
        end_min = ((m_lo // T) // C + 1) * C
        end_max = ((m_hi // T) // C + 1) * C
        hi = tl.minimum(end_max * T, Lk)
        lo = (tl.maximum(end_min - W, 0) * T // BLOCK_N) * BLOCK_N
        sink_hi = tl.minimum(SINK * T, lo)
    else:
        hi = Lk
        lo = 0
        sink_hi = 0
    return sink_hi, lo, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, offs_m, offs_d, d_ok, start, stop,
               Lq, Lk, T, C, SINK, W, qk_scale,
               CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))                                # [BLOCK_M, BLOCK_N]
        vis = _visible(offs_m, offs_n, Lq, Lk, T, C, SINK, W, CAUSAL)
        qk = tl.where(vis, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DOT_F32:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bc_fwd_kernel(Q, K, V, Out, Lse,
                   stride_qb, stride_qm, stride_kb, stride_kn, stride_h,
                   H, Lq, Lk, D, T, C, SINK, W, qk_scale,
                   CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(Lq, BLOCK_M), B * H); q/out share strides, k/v share strides
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # int64: batch offsets can pass 2**31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_off = b * stride_qb + h * stride_h + offs_m[:, None] * stride_qm + offs_d[None, :]
    q_mask = (offs_m < Lq)[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)                     # [BLOCK_M, BLOCK_D]
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_h
    v_base = V + b * stride_kb + h * stride_h
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_lo = pid_m * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, Lq) - 1
    sink_hi, lo, hi = _key_range(m_lo, m_hi, Lk, T, C, SINK, W, CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, offs_m, offs_d, d_ok,
                               0, sink_hi, Lq, Lk, T, C, SINK, W, qk_scale, CAUSAL, DOT_F32, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, offs_m, offs_d, d_ok,
                               lo, hi, Lq, Lk, T, C, SINK, W, qk_scale, CAUSAL, DOT_F32, BLOCK_N)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=q_mask)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))   # base 2; inf -> p = 0
    tl.store(Lse + pid_bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _bc_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta,
                        stride_qb, stride_qm, stride_kb, stride_kn, stride_h,
                        H, Lq, Lk, D, T, C, SINK, W, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(Lk, BLOCK_N), B * H); one program = one key tile, loops over query tiles
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # int64: batch offsets can pass 2**31
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_off = b * stride_kb + h * stride_h + offs_n[:, None] * stride_kn + offs_d[None, :]
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)                   # [BLOCK_N, BLOCK_D]
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query tiles that can see this key tile
    if CAUSAL:
        fk_min = (pid_n * BLOCK_N) // T
        fk_max = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, Lk) - 1) // T
        q_lo = ((fk_min // C) * C * T // BLOCK_M) * BLOCK_M
        q_hi = tl.minimum(((fk_max + W) // C) * C * T, Lq)
        if fk_min < SINK:
            q_hi = Lq
    else:
        q_lo = 0
        q_hi = Lq
    q_base = b * stride_qb + h * stride_h
    for start_m in range(q_lo, q_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_off = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
        q_mask = (offs_m < Lq)[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            qkT = tl.dot(k, tl.trans(q), input_precision="ieee")       # [BLOCK_N, BLOCK_M]
        else:
            qkT = tl.dot(k, tl.trans(q))
        vis = tl.trans(_visible(offs_m, offs_n, Lq, Lk, T, C, SINK, W, CAUSAL))
        pT = tl.where(vis, tl.exp2(qkT * qk_scale - lse[None, :]), 0.0)
        if DOT_F32:
            dv += tl.dot(pT, do, input_precision="ieee")
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if DOT_F32:
            dk += tl.dot(dsT, q, input_precision="ieee")
        else:
            dk = tl.dot(dsT.to(q.dtype), q, dk)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, offs_m, offs_d, d_ok, start, stop,
              Lq, Lk, T, C, SINK, W, qk_scale,
              CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        vis = _visible(offs_m, offs_n, Lq, Lk, T, C, SINK, W, CAUSAL)
        p = tl.where(vis, tl.exp2(qk * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if DOT_F32:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bc_bwd_dq_kernel(Q, K, V, DO, DQ, Lse, Delta,
                      stride_qb, stride_qm, stride_kb, stride_kn, stride_h,
                      H, Lq, Lk, D, T, C, SINK, W, qk_scale, sm_scale,
                      CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(Lq, BLOCK_M), B * H); same key ranges as the forward
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # int64: batch offsets can pass 2**31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_off = b * stride_qb + h * stride_h + offs_m[:, None] * stride_qm + offs_d[None, :]
    q_mask = (offs_m < Lq)[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b * stride_kb + h * stride_h
    v_base = V + b * stride_kb + h * stride_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_lo = pid_m * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, Lq) - 1
    sink_hi, lo, hi = _key_range(m_lo, m_hi, Lk, T, C, SINK, W, CAUSAL, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, offs_m, offs_d, d_ok, 0, sink_hi,
                   Lq, Lk, T, C, SINK, W, qk_scale, CAUSAL, DOT_F32, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, offs_m, offs_d, d_ok, lo, hi,
                   Lq, Lk, T, C, SINK, W, qk_scale, CAUSAL, DOT_F32, BLOCK_N)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _fwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)]]


def _bwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2)]]


_KEY = ["Lq", "Lk", "BLOCK_D", "CAUSAL", "T"]
_fwd_autotuned = triton.autotune(_fwd_configs(), key=_KEY)(_bc_fwd_kernel)
_dkdv_autotuned = triton.autotune(_bwd_configs(), key=_KEY)(_bc_bwd_dkdv_kernel)
_dq_autotuned = triton.autotune(_bwd_configs(), key=_KEY)(_bc_bwd_dq_kernel)

INTERPRETER_BLOCK = (32, 32)


def _launch(kernel, tuned, block, n_rows, BH, args, meta, row_key):
    """Plain kernel with fixed tiles (tests / interpreter) or the autotuned twin (GPU)."""
    if block is None and not interpreting():
        tuned[lambda m: (triton.cdiv(n_rows, m[row_key]), BH)](*args, **meta)
    else:
        bm, bn = block or INTERPRETER_BLOCK
        kernel[(triton.cdiv(n_rows, bm if row_key == "BLOCK_M" else bn), BH)](
            *args, BLOCK_M=bm, BLOCK_N=bn, **meta)


class _BlockCausalFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, structure, block):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, Lq, H, D = q.shape
        Lk = k.shape[1]
        causal = structure is not None
        T, C, SINK, W = structure.kernel_args() if causal else (1, 1, 0, 1)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
        sm_scale = 1.0 / math.sqrt(D)
        meta = dict(CAUSAL=causal, DOT_F32=dot_f32(q.dtype), BLOCK_D=head_block(D))
        args = (q, k, v, out, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), q.stride(2),
                H, Lq, Lk, D, T, C, SINK, W, sm_scale * LOG2E)
        _launch(_bc_fwd_kernel, _fwd_autotuned, block, Lq, B * H, args, meta, "BLOCK_M")
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.structure, ctx.block = structure, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        B, Lq, H, D = q.shape
        Lk = k.shape[1]
        dout = dout.contiguous()
        causal = ctx.structure is not None
        T, C, SINK, W = ctx.structure.kernel_args() if causal else (1, 1, 0, 1)
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()   # [B, H, Lq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sm_scale = 1.0 / math.sqrt(D)
        meta = dict(CAUSAL=causal, DOT_F32=dot_f32(q.dtype), BLOCK_D=head_block(D))
        common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), q.stride(2),
                  H, Lq, Lk, D, T, C, SINK, W, sm_scale * LOG2E, sm_scale)
        _launch(_bc_bwd_dkdv_kernel, _dkdv_autotuned, ctx.block, Lk, B * H,
                (q, k, v, dout, dk, dv, lse, delta) + common, meta, "BLOCK_N")
        _launch(_bc_bwd_dq_kernel, _dq_autotuned, ctx.block, Lq, B * H,
                (q, k, v, dout, dq, lse, delta) + common, meta, "BLOCK_M")
        return dq, dk, dv, None, None


def supports(q, k, v, structure: BlockCausal | None = None, mode: str = "block_causal") -> bool:
    """Whether :func:`block_causal_attention` runs this call (False: it would return None)."""
    if mode not in ("block_causal", "full"):
        raise ValueError(f"mode must be 'block_causal' or 'full', got {mode!r}")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if (q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or D % 2
            or k.shape != (B, Lk, H, D) or v.shape != k.shape or not runnable(q, k, v)
            or B * H * Lq * Lk == 0):
        return False
    return mode == "full" or (structure is not None and Lq == Lk == structure.length)


def block_causal_attention(q, k, v, structure: BlockCausal | None = None, mode: str = "block_causal",
                           block: tuple[int, int] | None = None):
    """Attention q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D], differentiable.

    mode "block_causal" needs ``structure`` (Lq == Lk == structure.length); mode "full" is
    unmasked. Returns None when the call is outside what the kernel supports (:func:`supports`).
    """
    if not supports(q, k, v, structure, mode):
        return None
    return _BlockCausalFn.apply(q, k, v, structure if mode == "block_causal" else None, block)


def reference(q, k, v, structure: BlockCausal | None = None, dtype=None):
    """Plain PyTorch with the dense mask, in ``dtype`` (default fp32)."""
    dt = dtype or torch.float32
    qf, kf, vf = (t.to(dt).transpose(1, 2) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if structure is not None:
        s = s.masked_fill(~structure.dense(q.device), float("-inf"))
    p = torch.softmax(s.to(torch.promote_types(dt, torch.float32)), dim=-1).to(dt)
    return (p @ vf).transpose(1, 2)


def _test(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    st = BlockCausal(frames=5, tokens_per_frame=7, chunk_frames=2, sink_frames=1, window_frames=3)
    q, k, v = (torch.randn(2, st.length, 2, 32, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out = block_causal_attention(q, k, v, st)
    ref = reference(q, k, v, st)
    gk = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    print("fwd", (out.float() - ref).abs().max().item(),
          "bwd", max((a.float() - b.float()).abs().max().item() for a, b in zip(gk, gr)))


if __name__ == "__main__":
    _test()
