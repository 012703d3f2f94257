"""The server's control path, kept off the generation thread's critical path.

- :class:`EncodeCache`: recent prompt encodes (prompt -> per-layer cross-attention K/V),
  LRU, bounded in bytes, shared by every session (the tensors are only ever read).
- :class:`Prep`: one worker thread that does the slow per-session work before the
  generation thread sees it: prompt encodes (cached) and the opening chunk of a session
  (world render + autoencoder encode). Per session at most one pending join and one pending
  prompt (a newer prompt replaces an unprocessed older one: the latest wins), served
  round-robin across sessions, so one client's flood of switches waits behind its own
  newest message, never in front of another session's. The worker yields the CPU between
  jobs (busy at most ``duty`` of the time, ``duty_behind`` while the generation thread has no
  slack or is slowed down), starts a job while the generation thread is between steps, and
  runs at a lower OS priority where the OS allows it.
- :class:`StepModel`: the measured step time per batch size (calibration at start-up, then
  an exponential average of real steps) -> predicted step time and real-time capacity.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from streamgen.engine.chunk_step import generate_chunk

log = logging.getLogger("streamgen.server")


class EncodeCache:
    """LRU ``prompt -> cross-K/V`` (list of (K, V) [1, L, dim] per layer), bounded by bytes."""

    def __init__(self, encode: Callable[[str], list], max_bytes: int = 64 << 20):
        self._encode, self.max_bytes = encode, int(max_bytes)
        self._d: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    @staticmethod
    def _size(kv) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def get(self, prompt: str):
        """The cached encode of ``prompt`` or None."""
        with self._lock:
            kv = self._d.get(prompt)
            if kv is not None:
                self._d.move_to_end(prompt)
                self.hits += 1
            return kv

    def encode(self, prompt: str):
        kv = self.get(prompt)
        if kv is not None:
            return kv
        kv = self._encode(prompt)
        size = self._size(kv)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes and prompt not in self._d:
                self._d[prompt] = kv
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, old = self._d.popitem(last=False)
                    self.bytes -= self._size(old)
        return kv

    def __len__(self):
        return len(self._d)


@dataclass
class JoinPrep:
    """What the generation thread needs to give a session its row (built by :class:`Prep`)."""

    kv: list                                  # per-layer cross K/V [1, L, dim]
    z: torch.Tensor | None = None             # opening latents [1, F, C, h, w] (None: start from noise)
    actions: list | None = None               # per opening chunk: encoded actions [1, k, dim] or None
    vae_state: Any = None                     # decoder state after the opening frames
    start_frames: np.ndarray | None = None    # uint8 [N, H, W, 3]


class Prep:
    """The control worker: joins and prompt encodes, off the generation thread (see module doc).

    ``do_join(slot) -> JoinPrep`` and ``do_prompt(slot, prompt) -> kv`` run on the worker;
    ``deliver(slot, kind, result, error)`` hands the outcome to the generation thread.
    """

    def __init__(self, do_join, do_prompt, deliver, duty: float = 0.3, nice: int = 5,
                 behind: Callable[[], bool] | None = None, duty_behind: float = 0.1,
                 gate: threading.Event | None = None):
        self.do_join, self.do_prompt, self.deliver = do_join, do_prompt, deliver
        self.duty = min(1.0, max(0.05, float(duty)))
        self.duty_behind = min(self.duty, max(0.05, float(duty_behind)))
        self.behind = behind           # True while generation has no slack: the worker yields more
        self.gate = gate               # set while the generation thread is between steps
        self.nice = int(nice)
        self._order: collections.deque = collections.deque()     # slots with pending work, each once
        self._cv = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.jobs = 0
        self.coalesced = 0          # prompts replaced by a newer one before they were encoded
        self.busy_since: float | None = None
        self.last_done = time.monotonic()
        self._rest_until = 0.0          # duty cycle: no new job before this (monotonic)

    def start(self):
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="streamgen-prep", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0):
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Sessions waiting for the worker (each holds at most one join and one prompt)."""
        return len(self._order)

    def submit_join(self, slot):
        with self._cv:
            slot.want_join = True
            self._enqueue(slot)

    def submit_prompt(self, slot, prompt: str):
        with self._cv:
            if slot.want_prompt is not None:
                self.coalesced += 1
            slot.want_prompt = prompt           # latest wins
            self._enqueue(slot)

    def forget(self, slot):
        with self._cv:
            slot.want_join, slot.want_prompt = False, None
            if slot.queued:
                slot.queued = False
                try:
                    self._order.remove(slot)
                except ValueError:
                    pass

    def _enqueue(self, slot):
        if not slot.queued and not slot.closed:
            slot.queued = True
            self._order.append(slot)
            self._cv.notify()

    def _take(self, joins_only: bool = False):
        """Next (slot, kind, arg) round-robin; a slot with more work goes to the back of the line.
        ``joins_only``: while resting, only a new session's start is taken (prompts keep their turn)."""
        for _ in range(len(self._order)):
            slot = self._order.popleft()
            slot.queued = False
            if slot.closed:
                slot.want_join, slot.want_prompt = False, None
                continue
            if slot.want_join:
                slot.want_join = False
                job = (slot, "join", None)
            elif slot.want_prompt is not None and not joins_only:
                job = (slot, "prompt", slot.want_prompt)
                slot.want_prompt = None
            else:
                if slot.want_prompt is not None:
                    self._enqueue(slot)
                continue
            if slot.want_join or slot.want_prompt is not None:
                self._enqueue(slot)
            return job
        return None

    def _lower_priority(self):
        try:       # Linux: a thread id takes its own nice value; elsewhere this is a no-op
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
        except (AttributeError, OSError, PermissionError):
            pass

    def _loop(self):
        if self.nice > 0:
            self._lower_priority()
        torch.set_grad_enabled(False)
        while True:
            if self.gate is not None:         # start work in the generation thread's idle time
                self.gate.wait(0.5)
            with self._cv:
                job = None
                while self._running:
                    now = time.monotonic()
                    resting = now < self._rest_until      # leave the CPU to the generation thread
                    job = self._take(joins_only=resting)
                    if job is not None:
                        break
                    self._cv.wait(min(0.5, self._rest_until - now) if resting else 0.5)
                if not self._running:
                    return
            slot, kind, arg = job
            t0 = time.monotonic()
            self.busy_since = t0
            result, error = None, None
            try:
                result = self.do_join(slot) if kind == "join" else self.do_prompt(slot, arg)
            except Exception as e:        # reported to that session only
                error = e
            self.busy_since = None
            self.last_done = time.monotonic()
            self.jobs += 1
            try:
                self.deliver(slot, kind, result, error, arg)
            except Exception:  # pragma: no cover - delivery must not kill the worker
                log.exception("prep delivery failed")
            spent = time.monotonic() - t0
            duty = self.duty_behind if self.behind is not None and self.behind() else self.duty
            self._rest_until = time.monotonic() + min(5.0, spent * (1.0 - duty) / duty)


class StepModel:
    """Step time (ms) per batch size: calibrated at start, refined by an average of real steps."""

    def __init__(self, max_sessions: int, alpha: float = 0.2):
        self.max_sessions, self.alpha = int(max_sessions), float(alpha)
        self.ms: dict[int, float] = {}
        self._lock = threading.Lock()

    def observe(self, n: int, ms: float):
        with self._lock:
            old = self.ms.get(n)
            self.ms[n] = ms if old is None else (1 - self.alpha) * old + self.alpha * ms

    def predict(self, n: int) -> float | None:
        """Predicted step ms at batch ``n``: measured, else interpolated, else scaled from the
        nearest measured size (proportionally: pessimistic for a GPU, about right on a CPU)."""
        with self._lock:
            pts = sorted(self.ms.items())
        if not pts:
            return None
        for m, t in pts:
            if m == n:
                return t
        lo = [(m, t) for m, t in pts if m < n]
        hi = [(m, t) for m, t in pts if m > n]
        if lo and hi:
            (m0, t0), (m1, t1) = lo[-1], hi[0]
            return t0 + (t1 - t0) * (n - m0) / (m1 - m0)
        m, t = lo[-1] if lo else hi[0]
        return t * n / m if lo else t            # below the smallest measured size: no faster than it

    def capacity(self, budget_ms: float) -> int:
        """The largest batch (>= 1, <= max_sessions) whose predicted step fits ``budget_ms``."""
        best = 1
        for n in range(1, self.max_sessions + 1):
            t = self.predict(n)
            if t is None:
                return self.max_sessions
            if t <= budget_ms:
                best = n
            else:
                break
        return best

    def table(self) -> dict[int, float]:
        with self._lock:
            return {n: round(t, 2) for n, t in sorted(self.ms.items())}


@torch.no_grad()
def calibrate(batcher, sizes: list[int] | None = None, repeats: int = 2) -> dict[int, float]:
    """Time real steps (model + decode) of ``batcher`` on empty rows at growing batch sizes until
    one no longer fits the real-time budget; fills ``batcher.step_model``. Run before any session:
    leaves the cache empty and counts no forwards."""
    b = batcher
    if sizes is None:
        sizes = sorted({n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if n <= b.max_sessions}
                       | {b.max_sessions})
    b._counting = False
    try:
        _calib_step(b, 1)                              # warm-up
        for n in sizes:
            ms = sorted(_calib_step(b, n) for _ in range(max(1, repeats)))
            b.step_model.ms[n] = ms[len(ms) // 2]
            if ms[len(ms) // 2] > b.budget_ms:
                break
    finally:
        b.cache.reset()
        b._counting = True
    return b.step_model.table()


def _calib_step(b, n: int) -> float:
    pipe, c = b.pipe, b.pipe.config
    g = torch.Generator(device=pipe.device).manual_seed(n)
    shape = (n, b.k, c.model.in_channels, c.latent_height, c.latent_width)
    space = c.model.actions
    act = torch.zeros(n, b.k, space.dim, device=pipe.device, dtype=pipe.dtype) if space.enabled else None
    t0 = time.perf_counter()
    view = b._view(0, n)
    try:
        x0 = generate_chunk(pipe.model, view, pipe.sampler,
                            torch.randn(shape, generator=g, device=pipe.device, dtype=pipe.dtype),
                            lambda: torch.randn(shape, generator=g, device=pipe.device, dtype=pipe.dtype), act)
    finally:
        b._sync(view, 0, n)
    b._decode(x0, None if b._stateless_vae else [pipe.vae.init_state(1) for _ in range(n)])
    return (time.perf_counter() - t0) * 1000
