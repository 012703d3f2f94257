"""Preallocated streaming KV cache: a ring buffer with sink and anchor regions.

Layout of every layer's K and V: ``[B, (S + A + W) * T, H, D]`` = [sink | anchor | ring],
allocated once and written in place. Frame ``f`` lives in sink slot ``f`` when ``f < S``,
otherwise in ring slot ``S + A + (f - S) % W``; a new chunk overwrites the oldest ring
frames, so the cache always holds the sink plus the ``W`` most recent frames. Softmax does
not care about key order, so attention reads the whole buffer with a per-slot validity
vector: no slice copies, no clone-shift.

Per chunk the host computes the slot indices (plain Python ints, no device reads) and copies
them into static device tensors (``write_index``, ``key_valid``, ``q_pos``, ``k_pos``); the
chunk step only reads those, so it can be compiled and CUDA-graphed.

Policies (all chosen by string in :class:`CacheConfig`):
- sink "frame" (first frames kept), "ema" (Reward Forcing: each evicted frame ``e`` is blended
  into sink frame ``e % S``: sink <- a*sink + (1-a)*evicted), "none";
- rope "absolute" (keys rotated at their absolute frame before caching; Self-Forcing) or
  "relative" (keys cached unrotated, rotated at attention time with bounded positions:
  sink 0..S-1, anchor S..S+A-1, window frames S+A.. in frame order);
- anchors: :meth:`capture_anchor` copies the newest frames into the anchor region.

Models with ``frame_cond="last"`` also keep ``last_frame`` [B, C, h, w]: the clean latent of
the newest finished chunk's last frame (zeros before the first), which every frame of the next
chunk sees; :meth:`end_chunk` writes it in place after the chunk's context pass.
"""
from __future__ import annotations

import torch

from ..config import CacheConfig, ModelConfig
from ..errors import ConfigError


class StreamCache:
    def __init__(self, model_cfg: ModelConfig, cfg: CacheConfig, batch: int, tokens_per_frame: int,
                 chunk_frames: int, device=None, dtype=torch.float32,
                 latent_hw: tuple[int, int] | None = None):
        if chunk_frames > cfg.ring_frames:
            raise ConfigError(f"chunk of {chunk_frames} frames does not fit a window of {cfg.ring_frames}")
        self.cfg, self.model_cfg = cfg, model_cfg
        self.batch, self.T, self.chunk_frames = batch, tokens_per_frame, chunk_frames
        self.S, self.A, self.W = cfg.sink_frames, cfg.anchor_frames, cfg.ring_frames
        self.n_slots = self.S + self.A + self.W
        L, H, D = model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim
        n_tok = self.n_slots * self.T
        self.k = torch.zeros(L, batch, n_tok, H, D, device=device, dtype=dtype)   # [L, B, S_tok, H, D]
        self.v = torch.zeros_like(self.k)
        # static per-chunk inputs of the chunk step
        self.write_index = torch.zeros(batch, chunk_frames * self.T, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, n_tok, dtype=torch.bool, device=device)
        self.q_pos = torch.zeros(batch, chunk_frames, dtype=torch.long, device=device)
        self.k_pos = torch.zeros(batch, self.n_slots, dtype=torch.long, device=device)
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last_frame = None                                            # [B, C, h, w] or None
        if model_cfg.frame_cond != "none":
            if latent_hw is None:
                raise ConfigError("a frame_cond model's cache needs latent_hw=(latent height, width)")
            self.last_frame = torch.zeros(batch, model_cfg.in_channels, *latent_hw, device=device, dtype=dtype)
        # host bookkeeping (never read back from the device)
        self.slot_frame = [[-1] * self.n_slots for _ in range(batch)]
        self.next_frame = [0] * batch
        self._tok = torch.arange(self.T, device=device)

    # ------------------------------------------------------------------ host side
    @property
    def device(self):
        return self.k.device

    def slot_of(self, frame: int) -> int:
        if frame < self.S:
            return frame
        return self.S + self.A + (frame - self.S) % self.W

    def reset(self, rows=None):
        """Forget everything cached for ``rows`` (default: all)."""
        rows = range(self.batch) if rows is None else rows
        for r in rows:
            self.slot_frame[r] = [-1] * self.n_slots
            self.next_frame[r] = 0
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        self.key_valid[idx.to(self.device)] = False
        if self.last_frame is not None:
            self.last_frame[idx.to(self.device)] = 0

    def end_chunk(self, x0: torch.Tensor):
        """A chunk is finished: its clean latents x0 [B, k, C, h, w] (generated, or opening
        frames) give the next chunk's frame conditioning (``frame_cond="last"`` models; a no-op
        otherwise). Written in place."""
        if self.last_frame is not None:
            self.last_frame.copy_(x0[:, -1].to(self.last_frame.dtype))

    def begin_chunk(self, num_frames: int | None = None):
        """Prepare the slots for the next chunk of every row and advance the frame counter."""
        n = num_frames or self.chunk_frames
        frames = [list(range(f, f + n)) for f in self.next_frame]
        self.begin_frames(frames)
        self.next_frame = [f + n for f in self.next_frame]

    def begin_frames(self, frames: list[list[int]]):
        """Prepare slots for explicit frame indices per row (all rows the same count)."""
        n = len(frames[0])
        if n != self.chunk_frames:
            raise ConfigError(f"this cache runs chunks of {self.chunk_frames} frames, got {n}")
        if self.cfg.rope == "absolute" and max(max(f) for f in frames) >= self.model_cfg.rope_max_pos:
            raise ConfigError(f"absolute RoPE covers {self.model_cfg.rope_max_pos} latent frames; "
                              "use cache.rope='relative' for unbounded streams")
        write, valid, qpos, kpos, evict = [], [], [], [], []
        for r, fr in enumerate(frames):
            slots = [self.slot_of(f) for f in fr]
            for f, s in zip(fr, slots):
                old = self.slot_frame[r][s]
                if old >= 0 and old != f and s >= self.S + self.A and self.cfg.sink == "ema":
                    evict.append((r, s, old % self.S))
                self.slot_frame[r][s] = f
            end = max(fr) + 1
            # drop ring entries that left the window (only matters after explicit re-writes)
            for s in range(self.S + self.A, self.n_slots):
                f = self.slot_frame[r][s]
                if f >= 0 and not (end - self.W <= f < end):
                    self.slot_frame[r][s] = -1
            write.append(slots)
            valid.append([f >= 0 for f in self.slot_frame[r]])
            pos = self._positions(self.slot_frame[r], end)
            kpos.append(pos)
            qpos.append([pos[s] if self.cfg.rope == "relative" else f for f, s in zip(fr, slots)])
        if evict:
            self._ema_blend(evict)
        dev = self.device
        slots = torch.tensor(write, dtype=torch.long)                       # [B, n]
        tok = (slots[:, :, None] * self.T + self._tok.cpu()[None, None]).flatten(1)
        self.write_index.copy_(tok.to(dev, non_blocking=True))
        self.key_valid.copy_(torch.tensor(valid).repeat_interleave(self.T, 1).to(dev, non_blocking=True))
        self.q_pos.copy_(torch.tensor(qpos, dtype=torch.long).to(dev, non_blocking=True))
        self.k_pos.copy_(torch.tensor(kpos, dtype=torch.long).to(dev, non_blocking=True))

    def _positions(self, slot_frame: list[int], end: int) -> list[int]:
        """RoPE frame position of every slot under the relative policy."""
        S, A = self.S, self.A
        first = max(S, end - self.W)
        pos = []
        for s, f in enumerate(slot_frame):
            if s < S:
                pos.append(s)
            elif s < S + A:
                pos.append(s)
            else:
                pos.append(S + A + max(f - first, 0) if f >= 0 else 0)
        return pos

    def _ema_blend(self, evict):
        a = self.cfg.ema_alpha
        T = self.T
        with torch.no_grad():
            for r, s, sink in evict:
                src, dst = slice(s * T, (s + 1) * T), slice(sink * T, (sink + 1) * T)
                for buf in (self.k, self.v):
                    buf[:, r, dst].mul_(a).add_(buf[:, r, src], alpha=1 - a)

    def capture_anchor(self):
        """Copy the K/V of the newest ``A`` cached frames into the anchor region."""
        if self.A == 0:
            return
        T = self.T
        for r in range(self.batch):
            ring = [(f, s) for s, f in enumerate(self.slot_frame[r]) if s >= self.S + self.A and f >= 0]
            newest = sorted(ring)[-self.A:]
            for i, (f, s) in enumerate(newest):
                a = self.S + i
                self.k[:, r, a * T:(a + 1) * T] = self.k[:, r, s * T:(s + 1) * T]
                self.v[:, r, a * T:(a + 1) * T] = self.v[:, r, s * T:(s + 1) * T]
                self.slot_frame[r][a] = f
            for i in range(len(newest), self.A):
                self.slot_frame[r][self.S + i] = -1

    def cached_frames(self, row: int = 0) -> list[int]:
        """Frame indices currently held in the sink and ring of ``row``, sorted."""
        sf = self.slot_frame[row]
        return sorted(f for s, f in enumerate(sf) if f >= 0 and not (self.S <= s < self.S + self.A))

    def rows(self, a: int, b: int) -> "StreamCache":
        """A cache over rows ``a..b-1``: its device tensors are views of this cache's (writes land
        here, no copies); its host bookkeeping is its own. Call :meth:`merge_rows` after using it.
        ``cross_kv`` is left for the caller to set."""
        if not 0 <= a < b <= self.batch:
            raise ValueError(f"rows {a}..{b - 1} outside a cache of {self.batch} rows")
        v = object.__new__(StreamCache)
        v.__dict__.update(self.__dict__)
        v.batch = b - a
        v.k, v.v = self.k[:, a:b], self.v[:, a:b]
        for name in ("write_index", "key_valid", "q_pos", "k_pos"):
            setattr(v, name, getattr(self, name)[a:b])
        if self.last_frame is not None:
            v.last_frame = self.last_frame[a:b]
        v.slot_frame = [list(sf) for sf in self.slot_frame[a:b]]
        v.next_frame = list(self.next_frame[a:b])
        v.cross_kv = None
        return v

    def merge_rows(self, view: "StreamCache", a: int):
        """Take back the host bookkeeping of a :meth:`rows` view that starts at row ``a``."""
        b = a + view.batch
        self.slot_frame[a:b] = [list(sf) for sf in view.slot_frame]
        self.next_frame[a:b] = list(view.next_frame)

    def functional_view(self) -> "FunctionalCache":
        """This cache for one differentiable pass (training's exit step): its writes return new
        buffers and leave this cache's untouched, so later in-place writes cannot corrupt the
        autograd graph. Shares every tensor and the bookkeeping of this cache (read only)."""
        v = object.__new__(FunctionalCache)
        v.__dict__.update(self.__dict__)
        return v

    # ------------------------------------------------------------------ device side
    def _index(self, k_new: torch.Tensor) -> torch.Tensor:
        return self.write_index[:, :, None, None].expand(-1, -1, k_new.shape[2], k_new.shape[3])   # [B, n*T, H, D]

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Store the chunk's k/v [B, n*T, H, D] in place; return the full buffers of this layer."""
        idx = self._index(k_new)
        # under autocast K (after an fp32 norm) and V can arrive in different dtypes: store in the cache's
        self.k[layer].scatter_(1, idx, k_new.to(self.k.dtype))
        self.v[layer].scatter_(1, idx, v_new.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class FunctionalCache(StreamCache):
    """A :meth:`StreamCache.functional_view`: ``write`` returns the buffers with the chunk's
    k/v scattered in, as new tensors [B, S_tok, H, D]; the shared buffers stay as they were."""

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        idx = self._index(k_new)
        return (self.k[layer].scatter(1, idx, k_new.to(self.k.dtype)),
                self.v[layer].scatter(1, idx, v_new.to(self.v.dtype)))
