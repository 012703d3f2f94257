"""The one attention entry point of the engine; backends are chosen by string.

Layout everywhere: q [B, Lq, H, D], k/v [B, Lk, H, D]; ``mask`` is boolean, True = attend,
broadcastable to [B, H, Lq, Lk]. ``stream_attention`` is the inference form: the chunk's
queries against a cache buffer with a per-slot validity vector, keys optionally rotated by
position at attention time (so no rotated copy is kept in the cache).

Backends: "sdpa" (torch), "math" (plain reference), "triton" (streamgen.kernels), and the
optional "flex", "xformers", "flash". A backend that cannot run a call falls back to SDPA;
``resolve_backend`` says which backend a device can run, ``last_backend`` which one ran the
last call.

Block-causal training masks are structured: ``frame_mask`` returns a :class:`FrameMask`
(frames, tokens per frame, chunk, sink, window) that ``attention`` accepts in place of a
dense mask: the triton and flex backends use the structure (masked tiles are skipped), the
others materialise the dense [L, L] mask once per mask object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .rope import apply_rope

BACKENDS = ("sdpa", "math", "triton", "flex", "xformers", "flash")

_LAST: dict[str, str] = {}


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


def last_backend(kind: str = "attention") -> str | None:
    """Backend that ran the last ``attention`` (kind "attention") or ``stream_attention``
    (kind "stream") call in this process; None before the first call."""
    if kind not in ("attention", "stream"):
        raise ConfigError(f"last_backend kind must be 'attention' or 'stream', got {kind!r}")
    return _LAST.get(kind)


@dataclass(eq=False)
class FrameMask:
    """Frame-structured block-causal mask over ``frames * tokens_per_frame`` tokens.

    A query of frame ``fq`` sees key frame ``fk`` iff ``fk < end`` with ``end`` the end of its
    chunk, and, when ``window_frames > 0``, ``fk >= end - window_frames`` or ``fk < sink``.
    Behaves like the dense bool [L, L] tensor where a tensor is expected (indexing, ``~``,
    ``&``, torch functions, tensor attributes), so older callers keep working.
    """

    frames: int
    tokens_per_frame: int
    chunk_frames: int = 1
    sink_frames: int = 0
    window_frames: int = -1
    device: torch.device | None = None
    _dense: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def key(self) -> tuple:
        w = self.window_frames if self.window_frames > 0 else -1
        return (self.frames, self.tokens_per_frame, self.chunk_frames, self.sink_frames, w)

    def frame_visible(self, device=None) -> torch.Tensor:
        """Frame-level visibility [F, F] (True = attend)."""
        f = torch.arange(self.frames, device=device)
        end = (f // self.chunk_frames + 1) * self.chunk_frames         # end of each query's chunk
        kf = f[None, :]
        visible = kf < end[:, None]
        if self.window_frames > 0:
            visible = visible & ((kf >= end[:, None] - self.window_frames) | (kf < self.sink_frames))
        return visible

    def dense(self, device=None) -> torch.Tensor:
        """The bool [L, L] mask, materialised once per device."""
        dev = torch.device(device if device is not None else (self.device or "cpu"))
        if dev not in self._dense:
            T = self.tokens_per_frame
            self._dense[dev] = self.frame_visible(dev).repeat_interleave(T, 0).repeat_interleave(T, 1)
        return self._dense[dev]

    def visible_pairs(self) -> int:
        """Number of visible (query, key) token pairs."""
        return int(self.frame_visible().sum().item()) * self.tokens_per_frame ** 2

    def kernel_args(self) -> tuple[int, int, int, int]:
        """(T, C, SINK, W) for the kernels; "no window" is a window covering every frame."""
        w = self.window_frames if self.window_frames > 0 else self.frames + self.chunk_frames
        return self.tokens_per_frame, self.chunk_frames, self.sink_frames, w

    def mask_mod(self):
        """FlexAttention mask_mod(b, h, q_idx, kv_idx) computing the mask from indices."""
        T, C, sink, w = self.kernel_args()

        def mod(b, h, q_idx, kv_idx):
            end = (q_idx // T // C + 1) * C
            fk = kv_idx // T
            return (fk < end) & ((fk >= end - w) | (fk < sink))
        return mod

    # tensor compatibility ------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.length, self.length))

    def __getitem__(self, idx):
        return self.dense()[idx]

    def __invert__(self):
        return ~self.dense()

    def __and__(self, other):
        return self.dense() & _dense(other)

    def __or__(self, other):
        return self.dense() | _dense(other)

    def __getattr__(self, name):
        if name.startswith("_") or name in FrameMask.__dataclass_fields__:
            raise AttributeError(name)
        return getattr(self.dense(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        conv = lambda a: a.dense() if isinstance(a, FrameMask) else a  # noqa: E731
        args = tuple(conv(a) for a in args)
        kwargs = {k: conv(a) for k, a in (kwargs or {}).items()}
        return func(*args, **kwargs)


def _dense(mask, device=None):
    return mask.dense(device) if isinstance(mask, FrameMask) else mask


def math_attention(q, k, v, mask=None):
    """Plain softmax attention in fp32 (the reference every backend is checked against)."""
    mask = _dense(mask, q.device)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))        # [B, H, L, D]
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)


_BLOCK_MASKS: dict = {}
_FLEX_FN: dict = {}


def _flex_attention(q, k, v, mask):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, Lq, H, _ = q.shape
    Lk = k.shape[1]
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None                                      # no FlexAttention backward on CPU
    if q.device.type == "cuda" and "fn" not in _FLEX_FN:
        _FLEX_FN["fn"] = torch.compile(flex_attention, dynamic=False)
    fn = _FLEX_FN.get("fn", flex_attention) if q.device.type == "cuda" else flex_attention
    block_mask = None
    if isinstance(mask, FrameMask):
        key = (mask.key, Lq, Lk, str(q.device))
        if key not in _BLOCK_MASKS:
            if len(_BLOCK_MASKS) > 32:
                _BLOCK_MASKS.clear()
            _BLOCK_MASKS[key] = create_block_mask(mask.mask_mod(), None, None, Lq, Lk, device=q.device)
        block_mask = _BLOCK_MASKS[key]
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


def attention(q, k, v, mask=None, backend: str = "sdpa"):
    """softmax(q k^T / sqrt(D)) v -> [B, Lq, H, D]; mask: bool tensor or :class:`FrameMask`."""
    ran = resolve_backend(backend, q.device)
    out = None
    if ran == "math":
        out = math_attention(q, k, v, mask)
    elif ran == "triton":
        from .kernels_bridge import triton_attention
        out = triton_attention(q, k, v, mask)
    elif ran == "flex":
        out = _flex_attention(q, k, v, mask)
    elif ran == "xformers" and mask is None:
        import xformers.ops as xops
        out = xops.memory_efficient_attention(q, k, v)
    elif ran == "flash" and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func
        out = flash_attn_func(q, k, v)
    if out is None:
        ran, out = "sdpa", _sdpa(q, k, v, mask)
    _LAST["attention"] = ran
    return out


def stream_attention(q, k_cache, v_cache, key_valid, backend: str = "sdpa", k_rope=None, q_rope=None):
    """Chunk queries q [B, Lq, H, D] against a cache k/v [B, S, H, D].

    key_valid: [B, S] bool, slots that hold visible keys (the chunk's own slots included).
    k_rope: optional (cos, sin) [B, S, D/2] to rotate cached keys at attention time.
    q_rope: optional (cos, sin) [B, Lq, D/2] to rotate the queries the same way.
    """
    if resolve_backend(backend, q.device) == "triton":
        from .kernels_bridge import triton_stream_attention
        out = triton_stream_attention(q, k_cache, v_cache, key_valid, k_rope, q_rope)
        if out is not None:
            _LAST["stream"] = "triton"
            return out
    k = k_cache if k_rope is None else apply_rope(k_cache, *k_rope)
    q = q if q_rope is None else apply_rope(q, *q_rope)
    mask = key_valid[:, None, None, :]
    inner = backend if backend in ("math", "flex") else "sdpa"
    out = attention(q, k, v_cache, mask=mask, backend=inner)
    _LAST["stream"] = _LAST["attention"]
    return out


def frame_mask(num_frames: int, tokens_per_frame: int, *, mode: str = "bidirectional",
               chunk_frames: int = 1, sink_frames: int = 0, window_frames: int = -1,
               device=None, form: str = "structured"):
    """Mask for a full forward over ``num_frames`` frames of ``tokens_per_frame`` tokens.

    mode "bidirectional" -> None (no mask). mode "block_causal": a query frame sees every
    frame up to the end of its chunk; with ``window_frames > 0`` only the sink frames plus
    the last ``window_frames`` frames up to the end of its chunk (what a rolling cache holds).
    form "structured" returns a :class:`FrameMask` (what ``attention`` prefers), "dense"
    the bool [L, L] tensor.
    """
    if mode == "bidirectional":
        return None
    if mode != "block_causal":
        raise ConfigError(f"attention mode must be 'bidirectional' or 'block_causal', got {mode!r}")
    if form not in ("structured", "dense"):
        raise ConfigError(f"frame_mask form must be 'structured' or 'dense', got {form!r}")
    fm = FrameMask(num_frames, tokens_per_frame, chunk_frames, sink_frames, window_frames,
                   device=None if device is None else torch.device(device))
    return fm if form == "structured" else fm.dense()
