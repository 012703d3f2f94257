"""Streaming attention kernel vs PyTorch (interpreter on CPU, tiny shapes).

Acceptance as flash-attention's tests: max|kernel - fp64 truth| <= 2 * max|torch same-dtype
- truth| + a tiny floor. Caches are laid out [sink | anchor | ring] by frames of T tokens,
with per-row fill levels so the ring has wrapped in some rows and not in others.
"""
import pytest
import torch

from streamgen.models.attention import attention_backend, math_attention, resolve_backend, stream_attention, stream_backend

pytestmark = pytest.mark.skipif(resolve_backend("triton", "cpu") != "triton" and not torch.cuda.is_available(),
                                reason="triton cannot run here (no GPU and no TRITON_INTERPRET=1)")

from streamgen.kernels import stream_attention as sa  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def ring_valid(B, T, sink, anchor, ring, seen, chunk):
    """key_valid [B, (sink+anchor+ring)*T] and the slot frames of the current chunk.

    Row b has seen ``seen[b]`` frames before this chunk of ``chunk`` frames: sink frames are
    kept, the ring holds the newest ``ring`` frames (wrapped), the anchor holds one frame if
    ``anchor`` and anything was seen.
    """
    n = sink + anchor + ring
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        end = seen[b] + chunk
        for f in range(end):
            if f < sink:
                valid[b, f] = True
            elif f >= end - ring:
                valid[b, sink + anchor + (f - sink) % ring] = True
        if anchor and seen[b]:
            valid[b, sink] = True
    return valid.repeat_interleave(T, 1)


def check(out, q, k, v, valid, k_rope=None, q_rope=None):
    truth = sa.reference(q, k, v, valid, k_rope, q_rope, dtype=torch.float64)
    same = sa.reference(q, k, v, valid, k_rope, q_rope, dtype=q.dtype)
    err = (out.double() - truth).abs().max().item()
    err_pt = (same.double() - truth).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[q.dtype], (err, err_pt)


def rope(B, L, D, g):
    ang = torch.rand(B, L, D // 2, generator=g) * 20.0
    return ang.cos().to(DEV), ang.sin().to(DEV)


CASES = [  # B, H, D, T, sink, anchor, ring, chunk, seen per row, block
    (2, 2, 32, 7, 1, 0, 4, 2, (0, 9), (16, 16)),     # ragged T, wrapped ring in row 1, empty in row 0
    (1, 3, 16, 5, 0, 0, 3, 1, (7,), (32, 16)),       # no sink; Lq=5 < tile
    (2, 1, 64, 13, 2, 1, 3, 3, (3, 11), (16, 32)),   # sink + anchor, chunk of 3
    (3, 2, 32, 9, 1, 1, 5, 2, (1, 4, 20), (32, 32)),  # batch 3, different fill levels
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("rope_mode", ["none", "k", "qk"])
def test_stream_kernel_matches_reference(dtype, case, rope_mode):
    B, H, D, T, sink, anchor, ring, chunk, seen, block = CASES[case]
    g = torch.Generator().manual_seed(case)
    valid = ring_valid(B, T, sink, anchor, ring, seen, chunk).to(DEV)
    S, Lq = valid.shape[1], chunk * T
    q = torch.randn(B, Lq, H, D, generator=g).to(DEV, dtype)
    k, v = (torch.randn(B, S, H, D, generator=g).to(DEV, dtype) for _ in range(2))
    k_rope = rope(B, S, D, g) if rope_mode in ("k", "qk") else None
    q_rope = rope(B, Lq, D, g) if rope_mode == "qk" else None
    out = sa.stream_attention(q, k, v, valid, k_rope=k_rope, q_rope=q_rope, block=block)
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    check(out, q, k, v, valid, k_rope, q_rope)


def test_non_contiguous_query_and_default_tiles():
    g = torch.Generator().manual_seed(5)
    B, Lq, S, H, D = 2, 19, 45, 2, 32
    qkv = torch.randn(B, Lq, 3, H, D, generator=g).to(DEV)   # q is a strided view, as in the model
    q = qkv[:, :, 0]
    k, v = (torch.randn(B, S, H, D, generator=g).to(DEV) for _ in range(2))
    valid = torch.rand(B, S, generator=g).to(DEV) > 0.5
    out = sa.stream_attention(q, k, v, valid)
    check(out, q, k, v, valid)
    out_all = sa.stream_attention(q, k, v, None)              # no validity vector: every slot
    check(out_all, q, k, v, torch.ones(B, S, dtype=torch.bool, device=DEV))


def test_invalid_slots_never_read():
    """Stale slots (here NaN) must not leak into the result; an empty row gives zeros."""
    g = torch.Generator().manual_seed(6)
    B, Lq, S, H, D = 2, 10, 40, 2, 16
    q = torch.randn(B, Lq, H, D, generator=g).to(DEV)
    k, v = (torch.randn(B, S, H, D, generator=g).to(DEV) for _ in range(2))
    valid = torch.zeros(B, S, dtype=torch.bool, device=DEV)
    valid[0, 3:11] = True
    valid[0, 30:] = True
    clean = sa.stream_attention(q, k, v, valid, block=(16, 16))
    k[~valid], v[~valid] = float("nan"), float("nan")
    out = sa.stream_attention(q, k, v, valid, block=(16, 16))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, atol=0, rtol=0)
    assert (out[1] == 0).all()


def test_entry_point_uses_kernel_and_falls_back():
    g = torch.Generator().manual_seed(7)
    B, Lq, S, H, D = 2, 11, 30, 2, 32
    q = torch.randn(B, Lq, H, D, generator=g).to(DEV)
    k, v = (torch.randn(B, S, H, D, generator=g).to(DEV) for _ in range(2))
    valid = torch.rand(B, S, generator=g).to(DEV) > 0.3
    k_rope = rope(B, S, D, g)
    assert stream_backend(q, k, v, valid, "triton", k_rope=k_rope) == "triton"
    out = stream_attention(q, k, v, valid, backend="triton", k_rope=k_rope)
    assert stream_backend(q, k, v, valid, "math", k_rope=k_rope) == "math"
    ref = stream_attention(q, k, v, valid, backend="math", k_rope=k_rope)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # outside the kernel's contract -> None from the wrapper, SDPA in the entry point
    assert sa.stream_attention(q, k.half(), v, valid) is None and not sa.supports(q, k.half(), v, valid)
    qg = q.clone().requires_grad_()
    assert stream_backend(qg, k, v, valid, "triton", k_rope=k_rope) == "sdpa"
    out_g = stream_attention(qg, k, v, valid, backend="triton", k_rope=k_rope)
    assert out_g.requires_grad
    torch.testing.assert_close(out_g.detach(), ref, atol=1e-5, rtol=1e-5)


def test_key_only_dense_mask_through_attention():
    """attention(mask=[B,1,1,Lk]) with backend "triton" runs the streaming kernel."""
    from streamgen.models.attention import attention
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 9, 2, 16, generator=g).to(DEV)
    k, v = (torch.randn(2, 21, 2, 16, generator=g).to(DEV) for _ in range(2))
    mask = (torch.rand(2, 21, generator=g) > 0.4).to(DEV)[:, None, None, :]
    assert attention_backend(q, k, v, mask, "triton") == "triton"
    out = attention(q, k, v, mask, backend="triton")
    torch.testing.assert_close(out, math_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_bf16_io():
    """bf16 I/O (in the interpreter the tile products run on fp32 operands)."""
    B, H, D, T, sink, anchor, ring, chunk, seen, block = CASES[0]
    g = torch.Generator().manual_seed(0)
    valid = ring_valid(B, T, sink, anchor, ring, seen, chunk).to(DEV)
    S, Lq = valid.shape[1], chunk * T
    q = torch.randn(B, Lq, H, D, generator=g).to(DEV, torch.bfloat16)
    k, v = (torch.randn(B, S, H, D, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    k_rope = rope(B, S, D, g)
    out = sa.stream_attention(q, k, v, valid, k_rope=k_rope, block=block)
    assert out.dtype == torch.bfloat16
    check(out, q, k, v, valid, k_rope)
