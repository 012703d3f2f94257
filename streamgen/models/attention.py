"""The one attention entry point of the engine; backends are chosen by string.

Layout everywhere: q [B, Lq, H, D], k/v [B, Lk, H, D]; ``mask`` is boolean, True = attend,
broadcastable to [B, H, Lq, Lk], or a :class:`~streamgen.models.masks.FrameMask` (the structured
block-causal mask of a full forward). ``stream_attention`` is the inference form: the
chunk's queries against a cache buffer with a per-slot validity vector, keys optionally
rotated by position at attention time (so no rotated copy is kept in the cache).

Backends: "sdpa" (torch), "math" (plain reference), "triton" (streamgen.kernels), and the
optional "flex", "xformers", "flash". A backend that cannot run a call falls back to SDPA.
Which backend runs is decided before the call, by pure functions of the call's inputs:
``resolve_backend`` (what a device can run), ``attention_backend`` / ``stream_backend``
(what one call runs, fallbacks included); the runners never fall back on their own, so
these reports are the truth, and nothing is recorded in module state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .masks import FrameMask, dense as _dense, frame_mask  # noqa: F401  (re-exported)
from .rope import apply_rope

BACKENDS = ("sdpa", "math", "triton", "flex", "xformers", "flash")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """The backend that will actually run on ``device`` (falls back to "sdpa")."""
    check_backend(name)
    if name == "triton":
        from .kernels_bridge import triton_available
        return "triton" if triton_available(device) else "sdpa"
    if name in ("xformers", "flash"):
        dev = torch.device(device)
        if dev.type != "cuda":
            return "sdpa"
        try:
            __import__("xformers.ops" if name == "xformers" else "flash_attn")
        except ImportError:
            return "sdpa"
    if name == "flex":
        try:
            __import__("torch.nn.attention.flex_attention")
        except ImportError:
            return "sdpa"
    return name


def attention_backend(q, k, v, mask=None, backend: str = "sdpa") -> str:
    """The backend ``attention(q, k, v, mask, backend)`` runs, fallbacks included."""
    ran = resolve_backend(backend, q.device)
    if ran == "triton":
        from .kernels_bridge import triton_attention_supported
        ok = triton_attention_supported(q, k, v, mask)
    elif ran == "flex":      # FlexAttention refuses CPU inputs that require grad (even under no_grad)
        ok = q.device.type == "cuda" or not any(t.requires_grad for t in (q, k, v))
    elif ran == "xformers":
        ok = mask is None
    elif ran == "flash":
        ok = mask is None and q.dtype in (torch.float16, torch.bfloat16)
    else:
        ok = True
    return ran if ok else "sdpa"


def math_attention(q, k, v, mask=None):
    """Plain softmax attention in fp32 (the reference every backend is checked against)."""
    mask = _dense(mask, q.device)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))        # [B, H, L, D]
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)


def _flex_attention(q, k, v, mask):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, Lq, H, _ = q.shape
    Lk = k.shape[1]
    # on CUDA the compiled form (dynamo keeps its compiled code on flex_attention's code
    # object, so a fresh wrapper per call reuses it)
    fn = torch.compile(flex_attention, dynamic=False) if q.device.type == "cuda" else flex_attention
    block_mask = None
    if isinstance(mask, FrameMask):
        block_mask = mask.memo(("flex", Lq, Lk, str(q.device)), lambda: create_block_mask(
            mask.mask_mod(), None, None, Lq, Lk, device=q.device))
    elif mask is not None:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mb, mh = m.shape[0], m.shape[1]
        m = m.expand(max(mb, B), max(mh, H), Lq, Lk)
        block_mask = create_block_mask(lambda b, h, qi, ki: m[b, h, qi, ki], mb if mb > 1 else None,
                                       mh if mh > 1 else None, Lq, Lk, device=q.device)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


def _sdpa(q, k, v, mask):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=_dense(mask, q.device))
    return out.transpose(1, 2)


def _run(ran: str, q, k, v, mask):
    if ran == "math":
        return math_attention(q, k, v, mask)
    if ran == "triton":
        from .kernels_bridge import triton_attention
        return triton_attention(q, k, v, mask)
    if ran == "flex":
        return _flex_attention(q, k, v, mask)
    if ran == "xformers":
        import xformers.ops as xops
        return xops.memory_efficient_attention(q, k, v)
    if ran == "flash":
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v)
    return _sdpa(q, k, v, mask)


def attention(q, k, v, mask=None, backend: str = "sdpa"):
    """softmax(q k^T / sqrt(D)) v -> [B, Lq, H, D]; mask: bool tensor or :class:`FrameMask`.

    Runs :func:`attention_backend`'s choice for this call."""
    return _run(attention_backend(q, k, v, mask, backend), q, k, v, mask)


def _stream_inner(backend: str) -> str:
    """The dense-mask backend of a streaming call the triton kernel does not take."""
    return backend if backend in ("math", "flex") else "sdpa"


def stream_backend(q, k_cache, v_cache, key_valid, backend: str = "sdpa", k_rope=None, q_rope=None) -> str:
    """The backend ``stream_attention`` runs for these inputs, fallbacks included."""
    if resolve_backend(backend, q.device) == "triton":
        from .kernels_bridge import triton_stream_supported
        if triton_stream_supported(q, k_cache, v_cache, key_valid, k_rope, q_rope):
            return "triton"
    inner = _stream_inner(backend)
    if inner == "flex" and q.device.type != "cuda" and (
            _rotated_requires_grad(q, q_rope) or _rotated_requires_grad(k_cache, k_rope) or v_cache.requires_grad):
        return "sdpa"                                    # what attention_backend says for the rotated q/k
    return resolve_backend(inner, q.device)


def _rotated_requires_grad(t, rope) -> bool:
    """Whether ``apply_rope(t, *rope)`` (or t itself, rope None) will require grad."""
    if rope is None:
        return t.requires_grad
    return torch.is_grad_enabled() and (t.requires_grad or any(r.requires_grad for r in rope))


def stream_attention(q, k_cache, v_cache, key_valid, backend: str = "sdpa", k_rope=None, q_rope=None):
    """Chunk queries q [B, Lq, H, D] against a cache k/v [B, S, H, D].

    key_valid: [B, S] bool, slots that hold visible keys (the chunk's own slots included).
    k_rope: optional (cos, sin) [B, S, D/2] to rotate cached keys at attention time.
    q_rope: optional (cos, sin) [B, Lq, D/2] to rotate the queries the same way.
    Runs :func:`stream_backend`'s choice for this call.
    """
    ran = stream_backend(q, k_cache, v_cache, key_valid, backend, k_rope, q_rope)
    if ran == "triton":
        from .kernels_bridge import triton_stream_attention
        return triton_stream_attention(q, k_cache, v_cache, key_valid, k_rope, q_rope)
    k = k_cache if k_rope is None else apply_rope(k_cache, *k_rope)
    q = q if q_rope is None else apply_rope(q, *q_rope)
    return _run(ran, q, k, v_cache, key_valid[:, None, None, :])
