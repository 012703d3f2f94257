"""Attention masks of a full (cache-free) forward: the frame-structured block-causal mask.

A leaf module (torch only): the attention dispatcher and the Triton kernels both read the
structure from here, so the kernels import nothing of the engine.

``frame_mask`` returns a :class:`FrameMask` (frames, tokens per frame, chunk, sink, window)
that ``streamgen.models.attention.attention`` accepts in place of a dense mask: the triton and flex
backends use the structure (masked tiles are skipped), the others materialise the dense
[L, L] mask once per mask object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ConfigError


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
    _memo: dict = field(default_factory=dict, repr=False)   # this mask's derived forms, by key

    @property
    def length(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def key(self) -> tuple:
        w = self.window_frames if self.window_frames > 0 else -1
        return (self.frames, self.tokens_per_frame, self.chunk_frames, self.sink_frames, w)

    def memo(self, key, build: Callable[[], Any]):
        """``build()`` once per ``key`` for this mask object (dense forms, block masks)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

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
        T = self.tokens_per_frame
        return self.memo(("dense", dev), lambda: self.frame_visible(dev).repeat_interleave(T, 0)
                         .repeat_interleave(T, 1))

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
        return self.dense() & dense(other)

    def __or__(self, other):
        return self.dense() | dense(other)

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


def dense(mask, device=None):
    """A dense bool mask from a :class:`FrameMask` (other masks, and None, pass through)."""
    return mask.dense(device) if isinstance(mask, FrameMask) else mask


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
