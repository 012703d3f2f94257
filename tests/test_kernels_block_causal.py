"""Block-causal training kernel (forward + backward) vs PyTorch with the dense mask.

Acceptance as flash-attention's tests: for the output and each gradient,
max|kernel - fp64 truth| <= 2 * max|torch same-dtype - fp64 truth| + a tiny floor.
"""
import math

import pytest
import torch

from streamgen.models.attention import FrameMask, attention, attention_backend, resolve_backend

pytestmark = pytest.mark.skipif(resolve_backend("triton", "cpu") != "triton" and not torch.cuda.is_available(),
                                reason="triton cannot run here (no GPU and no TRITON_INTERPRET=1)")

from streamgen.kernels import block_causal as bc  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4}

STRUCTURES = [  # frames, tokens_per_frame, chunk, sink, window
    (5, 7, 2, 1, 3),       # ragged T, sink + window (a band of masked tiles between them)
    (6, 5, 3, 0, -1),      # chunk-wise causal, no window
    (7, 3, 1, 2, 2),       # frame-wise, sink 2, window 2
    (4, 9, 1, 0, 1),       # window of one frame, no sink
]


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _check(got, q, k, v, do, structure):
    truth = _fwd_bwd(lambda a, b, c: bc.reference(a, b, c, structure, dtype=torch.float64), q, k, v, do)
    same = _fwd_bwd(lambda a, b, c: bc.reference(a, b, c, structure, dtype=q.dtype), q, k, v, do)
    for name, x, t, s in zip(("out", "dq", "dk", "dv"), got, truth, same):
        err = (x.double() - t).abs().max().item()
        err_pt = (s.double() - t).abs().max().item()
        assert err <= 2 * err_pt + FLOOR[q.dtype], (name, err, err_pt)


def _inputs(B, Lq, Lk, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g).to(DEV, dtype)
    k, v = (torch.randn(B, Lk, H, D, generator=g).to(DEV, dtype) for _ in range(2))
    do = torch.randn(B, Lq, H, D, generator=g).to(DEV, dtype)
    return q, k, v, do


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(STRUCTURES)))
def test_block_causal_fwd_bwd(dtype, case):
    st = FrameMask(*STRUCTURES[case])
    q, k, v, do = _inputs(2, st.length, st.length, 2, 32, dtype, case)
    got = _fwd_bwd(lambda a, b, c: bc.block_causal_attention(a, b, c, st, block=(16, 16)), q, k, v, do)
    _check(got, q, k, v, do, st)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_mode_lq_ne_lk(dtype):
    q, k, v, do = _inputs(2, 13, 37, 3, 16, dtype, 9)
    got = _fwd_bwd(lambda a, b, c: bc.block_causal_attention(a, b, c, mode="full", block=(16, 32)), q, k, v, do)
    _check(got, q, k, v, do, None)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_masked_tiles_are_skipped():
    """Keys no query of a tile can see are poisoned with NaN: any visit would give NaN."""
    st = FrameMask(frames=8, tokens_per_frame=16, chunk_frames=2, sink_frames=1, window_frames=2)
    q, k, v, _ = _inputs(1, st.length, st.length, 1, 16, torch.float32, 3)
    # the last chunk (frames 6, 7) sees frames 0 and 6, 7; frames 1..5 are never visited by it
    v_bad, k_bad = v.clone(), k.clone()
    v_bad[:, 16:96] = float("nan")
    k_bad[:, 16:96] = float("nan")
    out = bc.block_causal_attention(q, k_bad, v_bad, st, block=(16, 16))
    last = slice(96, 128)
    assert torch.isfinite(out[:, last]).all()
    ref = bc.reference(q, k, v, st)
    torch.testing.assert_close(out[:, last], ref[:, last], atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[:, 16:96]).all()   # queries that do see the poison get NaN (test is live)


def test_against_flex_attention():
    """The triton path and FlexAttention (same FrameMask structure) agree, forward + grads."""
    st = FrameMask(frames=4, tokens_per_frame=8, chunk_frames=2, sink_frames=1, window_frames=2)
    q, k, v, do = _inputs(1, st.length, st.length, 2, 16, torch.float32, 4)
    with torch.no_grad():
        assert attention_backend(q, k, v, st, "triton") == "triton"
        assert attention_backend(q, k, v, st, "flex") == "flex"
        out = attention(q, k, v, st, backend="triton")
        ref = attention(q, k, v, st, backend="flex")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    got = _fwd_bwd(lambda a, b, c: attention(a, b, c, st, backend="triton"), q, k, v, do)
    ref = _fwd_bwd(lambda a, b, c: attention(a, b, c, st, backend="flex"), q, k, v, do)
    # FlexAttention has no CPU backward: there the entry point falls back to SDPA (and says so)
    qg = q.detach().clone().requires_grad_()
    assert attention_backend(qg, k, v, st, "flex") == ("flex" if DEV == "cuda" else "sdpa")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_unsupported_returns_none():
    st = FrameMask(frames=3, tokens_per_frame=4)
    q, k, v, _ = _inputs(1, 12, 12, 1, 16, torch.float32, 0)
    assert bc.block_causal_attention(q, k, v, FrameMask(frames=2, tokens_per_frame=4)) is None   # wrong length
    assert bc.block_causal_attention(q, k.half(), v, st) is None
    with pytest.raises(ValueError):
        bc.block_causal_attention(q, k, v, st, mode="causal")
    assert math.isfinite(bc.block_causal_attention(q, k, v, st).sum().item())
