"""Cross-session scheduler: every active stream advances in ONE batched model forward.

One :class:`~streamgen.cache.StreamCache` with ``max_sessions`` rows is allocated up front.
Active sessions occupy rows ``0..n-1`` (kept compact: when a session leaves, the last row
is moved into its place), so a step runs the engine's ``generate_chunk`` on a *view* of the
first ``n`` rows: ``len(denoising_steps) + 1`` model forwards per chunk for all sessions
together, each row at its own frame position with its own prompt cross-K/V, actions and
noise generator (seeded per session, drawn in the same order as ``Pipeline.session``, so a
batched row reproduces a solo session).

All cache mutation happens on the worker thread; other threads only enqueue commands
(join, prompt, leave) or overwrite a session's latest action (latest input wins, applied
at the next chunk boundary). Steps are paced to real time (``pace=1``: one chunk every
``chunk_frames / fps`` seconds; ``pace=2`` twice as fast; ``pace=0`` as fast as possible).
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from streamgen.errors import StreamgenError
from streamgen.pipeline import recache
from streamgen.streaming import generate_chunk

log = logging.getLogger("streamgen.server")


class Busy(StreamgenError):
    """Every session slot is taken."""


@dataclass
class Chunk:
    """What one step produced for one session."""

    first_frame: int          # stream index of frames[0]
    frames: np.ndarray        # uint8 [T, H, W, 3]
    action_seq: int | None    # client seq of the action these frames reflect
    chunk_index: int
    step_ms: float            # wall time of the batched step (model + decode)
    batch: int                # sessions in that step
    done_at: float            # time.monotonic() when the frames existed


@dataclass
class StreamSlot:
    """The scheduler's view of one session (created by :meth:`Batcher.open`)."""

    id: str
    prompt: str
    seed: int
    on_chunk: Callable[[Chunk], None]
    on_end: Callable[[str, str], None]
    action: tuple = (None, None)              # (validated action dict | None, seq | None)
    row: int | None = None
    closed: bool = False
    frames: int = 0
    chunks: int = 0
    generator: Any = None
    vae_state: Any = None
    latents: dict = field(default_factory=dict)


class Batcher:
    def __init__(self, pipe, max_sessions: int = 8, pace: float = 1.0, max_stream_frames: int | None = None):
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.pipe, self.max_sessions, self.pace = pipe, int(max_sessions), float(pace)
        c = pipe.config
        self.k = c.sampler.chunk_frames
        self.video_chunk = self.k * c.temporal_stride
        self.interval = (self.video_chunk / c.fps / self.pace) if self.pace > 0 else 0.0
        self.max_stream_frames = max_stream_frames
        self.cache = pipe.new_cache(self.max_sessions)
        kv = pipe.encode_prompt("empty")
        self.cross = [(torch.zeros((self.max_sessions,) + k.shape[1:], dtype=k.dtype, device=k.device),
                       torch.zeros((self.max_sessions,) + v.shape[1:], dtype=v.dtype, device=v.device))
                      for k, v in kv]
        self.rows: list[StreamSlot] = []
        self._stateless_vae = pipe.vae.init_state(1) is None
        self._cmds: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._reserved = 0
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._running = False
        # counters (read by /metrics and tests)
        self.forward_calls = 0
        self.steps = 0
        self.frames_out = 0
        self.batch_sizes: collections.deque = collections.deque(maxlen=4096)   # rows per step
        self.forward_batch: collections.deque = collections.deque(maxlen=4096)  # rows per forward
        self.step_ms: collections.deque = collections.deque(maxlen=512)
        self.sessions_started = 0
        self.sessions_ended = 0
        self._hook = pipe.model.register_forward_pre_hook(self._count_forward)

    # ------------------------------------------------------------------ public (any thread)
    def start(self):
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="streamgen-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0):
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._hook.remove()

    @property
    def active(self) -> int:
        """Sessions holding a cache row right now."""
        return len(self.rows)

    @property
    def reserved(self) -> int:
        return self._reserved

    def open(self, prompt: str, seed: int, on_chunk, on_end) -> StreamSlot:
        """Reserve a slot (raises :class:`Busy` at once when full); the row is set up by the worker."""
        with self._lock:
            if self._reserved >= self.max_sessions:
                raise Busy(f"the server is at its limit of {self.max_sessions} concurrent sessions; try again later")
            self._reserved += 1
        slot = StreamSlot(id=f"s{next(self._ids)}", prompt=prompt, seed=int(seed), on_chunk=on_chunk, on_end=on_end)
        self._put(("join", slot, None))
        return slot

    def set_action(self, slot: StreamSlot, action: dict | None, seq: int | None):
        slot.action = (action, seq)          # one atomic assignment: latest input wins

    def set_prompt(self, slot: StreamSlot, prompt: str):
        self._put(("prompt", slot, prompt))

    def close(self, slot: StreamSlot):
        """Free the slot: its capacity at once, its cache row at the next chunk boundary."""
        with self._lock:
            if slot.closed:
                return
            slot.closed = True
            self._reserved -= 1
        self._put(("leave", slot, None))

    def describe(self) -> dict:
        sizes = list(self.batch_sizes)
        return {"active": self.active, "reserved": self._reserved, "max_sessions": self.max_sessions,
                "steps": self.steps, "forward_calls": self.forward_calls, "frames_out": self.frames_out,
                "last_batch": sizes[-1] if sizes else 0, "pace": self.pace,
                "step_ms_p50": float(np.median(self.step_ms)) if self.step_ms else None,
                "cache_memory_mb": self.cache.memory_bytes() / 2**20}

    # ------------------------------------------------------------------ worker
    def _put(self, cmd):
        self._cmds.put(cmd)
        self._wake.set()

    def _count_forward(self, module, args):
        self.forward_calls += 1
        if args:
            self.forward_batch.append(int(args[0].shape[0]))

    def _loop(self):
        next_tick = time.monotonic()
        while self._running:
            self._apply_commands()
            if not self.rows:
                self._wake.wait(0.25)
                self._wake.clear()
                next_tick = time.monotonic()
                continue
            now = time.monotonic()
            if now < next_tick:
                self._wake.wait(next_tick - now)
                self._wake.clear()
                continue               # apply commands that woke us, then re-check the tick
            next_tick = max(next_tick + self.interval, time.monotonic())
            try:
                self._step()
            except Exception as e:      # a failed step ends the sessions in it, never the server
                log.exception("batched step failed")
                for s in list(self.rows):
                    self._end(s, "internal", f"generation failed: {type(e).__name__}: {e}")
        # shutdown: free everything
        self._apply_commands()
        for s in list(self.rows):
            self._end(s, "shutdown", "the server is shutting down")

    def _apply_commands(self):
        while True:
            try:
                op, slot, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            try:
                if op == "join":
                    self._join(slot)
                elif op == "leave":
                    if slot.row is not None:
                        self._free(slot)
                elif op == "prompt" and slot.row is not None and not slot.closed:
                    self._set_prompt(slot, arg)
            except Exception as e:
                log.exception("command %s failed", op)
                self._end(slot, "internal", f"{op} failed: {type(e).__name__}: {e}")

    def _join(self, slot: StreamSlot):
        if slot.closed:
            return
        pipe = self.pipe
        r = len(self.rows)
        kv = pipe.encode_prompt(slot.prompt)
        self.cache.reset([r])
        for (K, V), (k, v) in zip(self.cross, kv):
            K[r].copy_(k[0])
            V[r].copy_(v[0])
        slot.generator = torch.Generator(device=pipe.device).manual_seed(slot.seed)
        slot.vae_state = pipe.vae.init_state(1)
        slot.row = r
        self.rows.append(slot)
        self.sessions_started += 1

    def _free(self, slot: StreamSlot):
        """Give the row back now: move the last row into it, forget the last row."""
        r, last = slot.row, len(self.rows) - 1
        c = self.cache
        if r != last:
            mover = self.rows[last]
            c.k[:, r].copy_(c.k[:, last])
            c.v[:, r].copy_(c.v[:, last])
            c.key_valid[r].copy_(c.key_valid[last])
            c.slot_frame[r] = list(c.slot_frame[last])
            c.next_frame[r] = c.next_frame[last]
            for K, V in self.cross:
                K[r].copy_(K[last])
                V[r].copy_(V[last])
            self.rows[r] = mover
            mover.row = r
        c.reset([last])
        self.rows.pop()
        slot.row = None
        slot.latents = {}
        slot.vae_state = None
        self.sessions_ended += 1

    def _end(self, slot: StreamSlot, reason: str, message: str):
        if slot.row is not None:
            self._free(slot)
        with self._lock:
            if not slot.closed:
                slot.closed = True
                self._reserved -= 1
        try:
            slot.on_end(reason, message)
        except Exception:  # pragma: no cover - callback errors must not kill the worker
            log.exception("on_end callback failed")

    def _view(self, a: int, b: int):
        """A StreamCache over rows a..b-1 of the shared cache; tensors are views (no copies)."""
        v = self.cache.rows(a, b)
        v.cross_kv = [(K[a:b], V[a:b]) for K, V in self.cross]
        return v

    def _sync(self, v, a: int, b: int):
        self.cache.merge_rows(v, a)

    def _set_prompt(self, slot: StreamSlot, prompt: str):
        pipe, r = self.pipe, slot.row
        kv = pipe.encode_prompt(prompt)
        for (K, V), (k, v) in zip(self.cross, kv):
            K[r].copy_(k[0])
            V[r].copy_(v[0])
        slot.prompt = prompt
        if pipe.config.cache.prompt_switch == "recache" and slot.latents:
            view = self._view(r, r + 1)
            recache(pipe, view, slot.latents)
            self._sync(view, r, r + 1)

    def _too_long(self, slot: StreamSlot) -> str | None:
        c = self.pipe.config
        nxt = self.cache.next_frame[slot.row]
        if c.cache.rope == "absolute" and nxt + self.k > c.model.rope_max_pos:
            return (f"this model (absolute RoPE) streams at most {c.model.rope_max_pos} latent frames "
                    f"({c.model.rope_max_pos * c.temporal_stride} video frames)")
        if self.max_stream_frames and slot.frames >= self.max_stream_frames:
            return f"the server's per-session limit of {self.max_stream_frames} frames is reached"
        return None

    @torch.no_grad()
    def _step(self):
        for s in list(self.rows):
            why = self._too_long(s)
            if why:
                self._end(s, "max_length", why)
        n = len(self.rows)
        if n == 0:
            return
        pipe, c = self.pipe, self.pipe.config
        k = self.k
        rows = list(self.rows)
        snap = [s.action for s in rows]                 # chunk boundary: take the latest actions
        acts = [pipe.encode_actions(a, k) for a, _ in snap]
        act = None if acts[0] is None else torch.cat(acts)
        one = (1, k, c.model.in_channels, c.latent_height, c.latent_width)

        def draw():
            return torch.cat([torch.randn(one, generator=s.generator, device=pipe.device, dtype=pipe.dtype)
                              for s in rows])

        t0 = time.perf_counter()
        view = self._view(0, n)
        starts = list(view.next_frame)
        try:
            x0 = generate_chunk(pipe.model, view, self.pipe.sampler, draw(), draw, act)
        finally:
            self._sync(view, 0, n)
        if c.cache.prompt_switch == "recache":
            for i, s in enumerate(rows):
                for j in range(k):
                    s.latents[starts[i] + j] = (x0[i:i + 1, j], None if act is None else act[i:i + 1, j])
                keep = set(self.cache.cached_frames(i))
                s.latents = {f: v for f, v in s.latents.items() if f in keep}
        if self._stateless_vae:
            frames, _ = pipe.vae.decode_chunk(x0, None)             # [n, T, 3, H, W]
            per_row = [frames[i] for i in range(n)]
        else:
            per_row = []
            for i, s in enumerate(rows):
                f, s.vae_state = pipe.vae.decode_chunk(x0[i:i + 1], s.vae_state)
                per_row.append(f[0])
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        u8 = [pipe.to_uint8(f) for f in per_row]
        ms = (time.perf_counter() - t0) * 1000
        self.steps += 1
        self.batch_sizes.append(n)
        self.step_ms.append(ms)
        done = time.monotonic()
        for i, s in enumerate(rows):
            ch = Chunk(first_frame=s.frames, frames=u8[i], action_seq=snap[i][1], chunk_index=s.chunks,
                       step_ms=ms, batch=n, done_at=done)
            s.frames += u8[i].shape[0]
            s.chunks += 1
            self.frames_out += u8[i].shape[0]
            if not s.closed:
                try:
                    s.on_chunk(ch)
                except Exception:  # pragma: no cover
                    log.exception("on_chunk callback failed")
