"""Bridge from the attention entry point to the Triton kernels in ``streamgen.kernels``.

Kept separate so that importing the engine never imports Triton. Returns None from the
attention functions when a call is outside what the kernels support (caller falls back).

Routing of ``attention(q, k, v, mask)`` with backend "triton":
- mask None -> ``block_causal_attention(mode="full")`` (differentiable; Lq != Lk allowed);
- :class:`~streamgen.models.masks.FrameMask` -> ``block_causal_attention`` (differentiable);
- a dense key-only mask [B|1, 1, 1, Lk] without autograd -> the streaming kernel;
- any other dense mask -> None (SDPA).
``stream_attention`` -> the streaming kernel (inference only: None when autograd records).
The ``*_supported`` predicates say beforehand whether a call runs, so the dispatcher in
``streamgen.models.attention`` knows (and can report) the backend of a call without running it.
With backend "triton" the model also runs the fused norms of ``kernels.fused_norm``
(q/k RMSNorm + RoPE, LayerNorm + adaLN modulate) when autograd does not record.
"""
from __future__ import annotations

import os

import torch


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device) -> bool:
    """True on CUDA with triton installed; on CPU only under TRITON_INTERPRET=1 (and only if
    the kernels were defined under it: the variable must be set before they are imported)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and _triton_importable()
    if dev.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1" or not _triton_importable():
        return False
    from streamgen.kernels import stream_attention as sa
    return type(sa._stream_attn_kernel).__name__ == "InterpretedFunction"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _key_only(mask, B: int, Lk: int) -> bool:
    """A dense key-only bool mask [B|1, 1, 1, Lk] (what the streaming kernel takes)."""
    return (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
            and mask.shape[1] == mask.shape[2] == 1 and mask.shape[3] == Lk and mask.shape[0] in (1, B))


def triton_attention_supported(q, k, v, mask) -> bool:
    """Whether :func:`triton_attention` runs this call (False: the caller runs SDPA)."""
    from streamgen.kernels import block_causal as bc
    from streamgen.models.masks import FrameMask
    if mask is None:
        return bc.supports(q, k, v, mode="full")
    if isinstance(mask, FrameMask):
        return bc.supports(q, k, v, mask, mode="block_causal")
    if _key_only(mask, q.shape[0], k.shape[1]) and not _needs_grad(q, k, v):
        from streamgen.kernels import stream_attention as sa
        return sa.supports(q, k, v, mask[:, 0, 0, :].expand(q.shape[0], k.shape[1]))
    return False


def triton_attention(q, k, v, mask):
    """Run a call :func:`triton_attention_supported` accepted (None otherwise)."""
    if not triton_attention_supported(q, k, v, mask):
        return None
    from streamgen.kernels.block_causal import block_causal_attention
    from streamgen.models.masks import FrameMask
    if mask is None:
        return block_causal_attention(q, k, v, mode="full")
    if isinstance(mask, FrameMask):
        return block_causal_attention(q, k, v, mask, mode="block_causal")
    from streamgen.kernels.stream_attention import stream_attention
    return stream_attention(q, k, v, mask[:, 0, 0, :].expand(q.shape[0], k.shape[1]))


def triton_stream_supported(q, k_cache, v_cache, key_valid, k_rope=None, q_rope=None) -> bool:
    """Whether :func:`triton_stream_attention` runs this call (inference only)."""
    if _needs_grad(q, k_cache, v_cache):
        return False
    from streamgen.kernels import stream_attention as sa
    return sa.supports(q, k_cache, v_cache, key_valid, k_rope=k_rope, q_rope=q_rope)


def triton_stream_attention(q, k_cache, v_cache, key_valid, k_rope, q_rope=None):
    if not triton_stream_supported(q, k_cache, v_cache, key_valid, k_rope, q_rope):
        return None
    from streamgen.kernels.stream_attention import stream_attention
    return stream_attention(q, k_cache, v_cache, key_valid, k_rope=k_rope, q_rope=q_rope)


def fused_rmsnorm_rope(x, weight, cos, sin, heads: int, eps: float):
    """RMSNorm(x) * weight then RoPE, x [B, L, dim] -> [B, L, H, D] in one kernel (inference:
    None when autograd records or the kernel cannot take the call; the caller runs PyTorch)."""
    if _needs_grad(x, weight, cos, sin):
        return None
    from streamgen.kernels.fused_norm import rmsnorm_rope
    return rmsnorm_rope(x, weight, cos, sin, heads, eps)


def fused_layernorm_modulate(x, shift, scale, eps: float):
    """LayerNorm(x) * (1 + scale) + shift per frame, x [B, L, dim] -> [B, L, dim] in one kernel
    (inference: None when autograd records or unsupported)."""
    if _needs_grad(x, shift, scale):
        return None
    from streamgen.kernels.fused_norm import layernorm_modulate
    return layernorm_modulate(x, shift, scale, eps)
