"""Cross-session scheduler: every active stream advances in ONE batched model forward.

One :class:`~streamgen.engine.cache.StreamCache` with ``max_sessions`` rows is allocated up front.
Active sessions occupy rows ``0..n-1`` (compact: a leaving session's row gets the last one), so a
step runs ``generate_chunk`` on a *view* of the first ``n`` rows (``len(denoising_steps) + 1``
forwards per chunk for all sessions), each row with its own frame position, prompt cross-K/V,
actions and noise generator (drawn as in ``Pipeline.session``: a row reproduces a solo session).

Threads. The generation thread ("streamgen-batcher") owns the cache and runs the steps; the
control worker (:class:`~.control.Prep`) prepares prompt encodes (cached, latest wins) and opening
chunks, copied into rows at a chunk boundary (one prompt switch per session and ``heavy_per_step``
cache writes per chunk). Actions: latest wins, at the next chunk. ``pace=1``: one chunk per
``chunk_frames / fps`` s; ``pace=0``: as fast as possible.

Admission: step time per batch size, measured at start-up (:meth:`calibrate`) and every step;
``"realtime"`` refuses a batch that misses the chunk period (one session always fits),
``"degrade"`` admits up to ``max_sessions`` and reports the real-time factor.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import numpy as np
import torch

from streamgen.engine.pipeline import check_start_frames, kept_latents, recache
from streamgen.engine.chunk_step import generate_chunk

from .control import EncodeCache, JoinPrep, Prep, StepModel, calibrate
from .slots import Busy, Chunk, StreamSlot

log = logging.getLogger("streamgen.server")
ADMISSION = ("realtime", "degrade")


class Batcher:
    def __init__(self, pipe, max_sessions: int = 8, pace: float = 1.0, max_stream_frames: int | None = None, *,
                 admission: str = "realtime", headroom: float = 0.85, calibrate: bool = True,
                 heavy_per_step: int = 2, prep_duty: float = 0.3, encode_cache_mb: float = 64.0):
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if admission not in ADMISSION:
            raise ValueError(f"admission must be one of {ADMISSION}, got {admission!r}")
        self.pipe, self.max_sessions, self.pace = pipe, int(max_sessions), float(pace)
        c = pipe.config
        self.k = c.sampler.chunk_frames
        self.video_chunk = self.k * c.temporal_stride
        self.chunk_period = self.video_chunk / c.fps                  # real time, s
        self.interval = (self.chunk_period / self.pace) if self.pace > 0 else 0.0
        self.admission, self.headroom = admission, float(headroom)
        self.budget_ms = self.chunk_period * 1000 * self.headroom
        self.heavy_per_step = max(1, int(heavy_per_step))
        self.max_stream_frames = max_stream_frames
        self._want_calibration = bool(calibrate)
        self._calib_ms: dict[int, float] = {}          # step ms per batch size on the idle server
        self.cache = pipe.new_cache(self.max_sessions)
        kv = pipe.encode_prompt("empty")
        self.cross = [(torch.zeros((self.max_sessions,) + k.shape[1:], dtype=k.dtype, device=k.device),
                       torch.zeros((self.max_sessions,) + v.shape[1:], dtype=v.dtype, device=v.device))
                      for k, v in kv]
        self.rows: list[StreamSlot] = []
        self._stateless_vae = pipe.vae.init_state(1) is None
        self._vae_lock = threading.Lock()          # the decoder may keep module state (Wan VAE)
        self.encodes = EncodeCache(pipe.encode_prompt, int(encode_cache_mb * 2**20))
        self.gen_idle = threading.Event()          # set while the generation thread waits between steps
        self.gen_idle.set()
        self.prep = Prep(self._prep_join, self._prep_prompt, self._deliver, duty=prep_duty, behind=self._behind,
                         gate=self.gen_idle)
        self.step_model = StepModel(self.max_sessions)
        self._ready: collections.deque = collections.deque()     # slots with prepared work, each once
        self._leaves: collections.deque = collections.deque()
        self._open: dict[str, StreamSlot] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._reserved = 0
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._running = False
        self._heavy_left = self.heavy_per_step
        self._counting = True
        # counters and health (read by /metrics, /healthz and tests)
        self.forward_calls = 0
        self.steps = 0
        self.frames_out = 0
        self.batch_sizes: collections.deque = collections.deque(maxlen=4096)   # rows per step
        self.forward_batch: collections.deque = collections.deque(maxlen=4096)  # rows per forward
        self.step_ms: collections.deque = collections.deque(maxlen=512)
        self.sessions_started = 0
        self.sessions_ended = 0
        self.admitted = 0
        self.refused = collections.Counter()          # reason -> count
        self.prompt_switches = 0
        self.last_step_done: float | None = None
        self.active_since: float | None = None
        self.calibrated = False
        self._hook = pipe.model.register_forward_pre_hook(self._count_forward)

    # ------------------------------------------------------------------ public (any thread)
    def start(self):
        """Calibrate (once; blocking), then start the control worker and the generation thread."""
        if self._thread is None:
            if self._want_calibration and not self.calibrated:
                self.calibrate()
            self.prep.start()
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="streamgen-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0):
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.prep.stop()
        self._hook.remove()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> int:
        """Sessions holding a cache row right now."""
        return len(self.rows)

    @property
    def reserved(self) -> int:
        return self._reserved

    def capacity(self) -> int:
        """Sessions this machine serves in real time (measured; ``max_sessions`` if unmeasured)."""
        return self.step_model.capacity(self.budget_ms)

    def realtime_factor(self, n: int | None = None) -> float | None:
        """Generation speed relative to real time at batch ``n`` (default: the current batch):
        chunk period / step time. Below 1 the streams run slower than real time."""
        n = n if n is not None else max(1, len(self.rows))
        t = self.step_model.predict(n)
        return None if not t else round(self.chunk_period * 1000 / t, 3)

    def open(self, prompt: str, seed: int, on_chunk, on_end, *, start: str | None = None,
             on_error=None) -> StreamSlot:
        """Reserve a slot (raises :class:`Busy` at once when there is no capacity); the control
        worker prepares the session and the generation thread gives it a row."""
        if start not in (None, "noise", "world"):
            raise ValueError(f"start must be 'noise' or 'world', got {start!r}")
        with self._lock:
            if self._reserved >= self.max_sessions:
                self.refused["full"] += 1
                raise Busy(f"the server is at its limit of {self.max_sessions} concurrent sessions; try again later")
            n = self._reserved + 1
            pred = self.step_model.predict(n)
            if self.admission == "realtime" and n > 1 and pred is not None and pred > self.budget_ms:
                self.refused["capacity"] += 1
                raise Busy(f"the server serves {self.capacity()} session(s) in real time on this machine "
                           f"(measured step {pred:.0f} ms at {n} sessions > {self.budget_ms:.0f} ms budget of a "
                           f"{self.chunk_period * 1000:.0f} ms chunk); try again later", reason="capacity")
            self._reserved += 1
            self.admitted += 1
            slot = StreamSlot(id=f"s{next(self._ids)}", prompt=prompt, seed=int(seed), on_chunk=on_chunk,
                              on_end=on_end, on_error=on_error, start=start or "noise")
            self._open[slot.id] = slot
        self.prep.submit_join(slot)
        return slot

    def set_action(self, slot: StreamSlot, action: dict | None, seq: int | None):
        slot.action = (action, seq)          # one atomic assignment: latest input wins

    def set_prompt(self, slot: StreamSlot, prompt: str):
        """Switch at a chunk boundary once encoded (off this thread); a newer prompt replaces a pending one."""
        if not slot.closed:
            self.prep.submit_prompt(slot, prompt)

    def close(self, slot: StreamSlot):
        """Free the slot: its capacity at once, its cache row at the next chunk boundary."""
        with self._lock:
            if slot.closed:
                return
            slot.closed = True
            self._leaves.append(slot)           # before the capacity is given back
            self._reserved -= 1
            self._open.pop(slot.id, None)
        self.prep.forget(slot)
        self._wake.set()

    def stalled_for(self) -> float:
        """Seconds since a step completed while sessions hold rows (0 when idle)."""
        if not self.rows or self.active_since is None:
            return 0.0
        return time.monotonic() - max(self.last_step_done or 0.0, self.active_since)

    def describe(self) -> dict:
        sizes = list(self.batch_sizes)
        return {"active": self.active, "reserved": self._reserved, "max_sessions": self.max_sessions,
                "capacity": self.capacity(), "admission": self.admission, "steps": self.steps,
                "forward_calls": self.forward_calls, "frames_out": self.frames_out,
                "last_batch": sizes[-1] if sizes else 0, "pace": self.pace,
                "step_ms_p50": float(np.median(self.step_ms)) if self.step_ms else None,
                "step_ms_by_batch": self.step_model.table(), "realtime_factor": self.realtime_factor(),
                "control_queue": self.prep.depth, "ready_queue": len(self._ready),
                "cache_memory_mb": self.cache.memory_bytes() / 2**20}

    # ------------------------------------------------------------------ calibration
    def calibrate(self, sizes: list[int] | None = None, repeats: int = 2) -> dict[int, float]:
        """Time real steps on empty rows at growing batch sizes (see :func:`.control.calibrate`)."""
        table = calibrate(self, sizes, repeats)
        self._calib_ms = dict(table)
        self.calibrated = True
        log.info("calibrated step ms by batch size: %s (real-time budget %.0f ms) -> capacity %d",
                 table, self.budget_ms, self.capacity())
        return table

    # ------------------------------------------------------------------ control worker (Prep thread)
    def _behind(self) -> bool:
        """The generation thread has no slack (its recent steps take most of the chunk interval) or
        is being slowed down (its steps take longer than calibrated on an idle server): the control
        worker should leave it the CPU."""
        if not self.rows or not self.step_ms:
            return False
        if self.interval <= 0:
            return True
        recent = sorted(itertools.islice(reversed(self.step_ms), 3))
        ms = recent[len(recent) // 2]
        calm = self._calib_ms.get(self.batch_sizes[-1]) if self.batch_sizes else None
        return ms > 0.8 * self.interval * 1000 or (calm is not None and ms > 1.25 * calm)

    def _prep_prompt(self, slot: StreamSlot, prompt: str):
        return self.encodes.encode(prompt)

    def _prep_join(self, slot: StreamSlot) -> JoinPrep:
        kv = self.encodes.encode(slot.prompt)
        if slot.start != "world" or slot.closed:          # (a session stopped meanwhile: no render)
            return JoinPrep(kv)
        p = self.pipe
        k = self.k
        frames = check_start_frames(p, p.opening_frames(slot.prompt, slot.seed))
        video = torch.from_numpy(np.ascontiguousarray(frames)).to(p.device)
        video = (video.permute(0, 3, 1, 2).float() / 127.5 - 1.0)[None].to(p.dtype)    # [1, N, 3, H, W]
        with self._vae_lock:
            z = p.vae.encode(video).to(p.dtype)                                         # [1, F, C, h, w]
            state = p.vae.init_state(1)
            for s in range(0, z.shape[1], k):
                _, state = p.vae.decode_chunk(z[:, s:s + k], state)
        acts = [p.encode_actions([None] * k, k) for _ in range(0, z.shape[1], k)]       # opening: no keys
        return JoinPrep(kv, z=z, actions=acts, vae_state=state, start_frames=frames)

    def _deliver(self, slot: StreamSlot, kind: str, result, error, arg):
        if slot.closed:
            return
        if error is not None and kind == "prompt":          # the session goes on with its old prompt
            if slot.on_error is not None:
                slot.on_error("bad_prompt", f"the prompt could not be encoded ({type(error).__name__}); "
                                            "the stream keeps its previous prompt")
            return
        with self._lock:
            if kind == "join":
                slot.ready_join = error if error is not None else result
            else:
                slot.ready_prompt = (arg, result)
            if not slot.in_ready:
                slot.in_ready = True
                self._ready.append(slot)
        self._wake.set()

    # ------------------------------------------------------------------ generation thread
    def _count_forward(self, module, args):
        if not self._counting:
            return
        self.forward_calls += 1
        if args:
            self.forward_batch.append(int(args[0].shape[0]))

    def _loop(self):
        torch.set_grad_enabled(False)
        next_tick = time.monotonic()
        while self._running:
            self._apply_control()
            if not self.rows:
                self._heavy_left = self.heavy_per_step
                self.active_since = None
                self._wake.wait(0.25)
                self._wake.clear()
                next_tick = time.monotonic()
                continue
            now = time.monotonic()
            if now < next_tick:
                self._wake.wait(next_tick - now)
                self._wake.clear()
                continue               # apply control work that woke us, then re-check the tick
            next_tick = max(next_tick + self.interval, time.monotonic())
            self.gen_idle.clear()
            try:
                self._step()
            except Exception as e:      # a failed step ends the sessions in it, never the server
                log.exception("batched step failed")
                for s in list(self.rows):
                    self._end(s, "internal", f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.gen_idle.set()
        # shutdown: free everything
        self._apply_control()
        for s in dict.fromkeys(list(self.rows) + list(self._open.values())):
            self._end(s, "shutdown", "the server is shutting down")

    def _requeue(self, slot: StreamSlot):
        with self._lock:
            if not slot.in_ready:
                slot.in_ready = True
                self._ready.append(slot)

    def _apply_control(self):
        """Leaves (all), then prepared joins and prompt switches, round-robin, within the budget."""
        while self._leaves:
            slot = self._leaves.popleft()
            if slot.row is not None:
                self._free(slot)
        for _ in range(len(self._ready)):
            with self._lock:
                if not self._ready:
                    return
                slot = self._ready.popleft()
                slot.in_ready = False
                job, switch = slot.ready_join, slot.ready_prompt
            if slot.closed:
                slot.ready_join = slot.ready_prompt = None
                continue
            try:
                if job is not None:
                    if isinstance(job, Exception):
                        slot.ready_join = None
                        log.warning("session %s could not start: %s: %s", slot.id, type(job).__name__,
                                    str(job)[:200])
                        self._end(slot, "internal", f"the session could not start: {type(job).__name__}")
                        continue
                    heavy = job.z is not None
                    if (heavy and self._heavy_left <= 0) or len(self.rows) >= self.max_sessions:
                        self._requeue(slot)
                        continue
                    slot.ready_join = None
                    self._heavy_left -= heavy
                    self._join(slot, job)
                if switch is not None:
                    heavy = self.pipe.config.cache.prompt_switch == "recache" and bool(slot.latents)
                    if slot.row is None or slot.switched_at == self.steps or (heavy and self._heavy_left <= 0):
                        self._requeue(slot)          # one switch per session per chunk, within the budget
                        continue
                    with self._lock:
                        prompt, kv = slot.ready_prompt
                        slot.ready_prompt = None
                    self._heavy_left -= heavy
                    self._set_prompt(slot, prompt, kv)
            except Exception as e:
                log.warning("control work for session %s failed: %s: %s", slot.id, type(e).__name__, str(e)[:200])
                self._end(slot, "internal", f"the session failed: {type(e).__name__}")

    def _copy_cross(self, r: int, kv):
        for (K, V), (k, v) in zip(self.cross, kv):
            K[r].copy_(k[0])
            V[r].copy_(v[0])

    def _join(self, slot: StreamSlot, job: JoinPrep):
        pipe = self.pipe
        r = len(self.rows)
        self.cache.reset([r])
        self._copy_cross(r, job.kv)
        slot.generator = torch.Generator(device=pipe.device).manual_seed(slot.seed)
        slot.vae_state = job.vae_state if job.z is not None else pipe.vae.init_state(1)
        slot.row = r
        if not self.rows:
            self.active_since = time.monotonic()
        self.rows.append(slot)
        self.sessions_started += 1
        if job.z is not None:
            self._write_start(slot, job)
            slot.start_frames = job.start_frames

    def _write_start(self, slot: StreamSlot, job: JoinPrep):
        """The opening chunk(s) as clean context in this row (as ``Session._write_start``)."""
        p, c, k, r = self.pipe, self.pipe.config, self.k, slot.row
        view = self._view(r, r + 1)
        keep = c.cache.prompt_switch == "recache"
        try:
            for i, s in enumerate(range(0, job.z.shape[1], k)):
                a = job.actions[i]
                start = view.next_frame[0]
                view.begin_chunk(k)
                t = torch.full((1, k), c.sampler.context_noise, device=p.device, dtype=torch.float32)
                p.model(job.z[:, s:s + k], t, cache=view, action=a)
                view.end_chunk(job.z[:, s:s + k])
                if keep:
                    for j in range(k):
                        slot.latents[start + j] = (job.z[:, s + j], None if a is None else a[:, j])
        finally:
            self._sync(view, r, r + 1)

    def _free(self, slot: StreamSlot):
        """Give the row back now: move the last row into it, forget the last row."""
        r, last = slot.row, len(self.rows) - 1
        c = self.cache
        if r != last:
            mover = self.rows[last]
            c.k[:, r].copy_(c.k[:, last])
            c.v[:, r].copy_(c.v[:, last])
            c.key_valid[r].copy_(c.key_valid[last])
            if c.last_frame is not None:
                c.last_frame[r].copy_(c.last_frame[last])
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
            self._open.pop(slot.id, None)
            if not slot.closed:
                slot.closed = True
                self._reserved -= 1
        self.prep.forget(slot)
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

    def _set_prompt(self, slot: StreamSlot, prompt: str, kv):
        r = slot.row
        self._copy_cross(r, kv)
        slot.prompt = prompt
        slot.switched_at = self.steps
        self.prompt_switches += 1
        if self.pipe.config.cache.prompt_switch == "recache" and slot.latents:
            view = self._view(r, r + 1)
            try:
                recache(self.pipe, view, slot.latents)
            finally:
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

    def _decode(self, x0: torch.Tensor, states: list | None) -> list[np.ndarray]:
        """Clean latents [n, k, ...] -> uint8 frames per row; ``states``: per-row decoder states
        (updated in place; None for a stateless decoder)."""
        pipe = self.pipe
        with self._vae_lock:
            if states is None:
                frames, _ = pipe.vae.decode_chunk(x0, None)             # [n, T, 3, H, W]
                per_row = [frames[i] for i in range(x0.shape[0])]
            else:
                per_row = []
                for i in range(x0.shape[0]):
                    f, states[i] = pipe.vae.decode_chunk(x0[i:i + 1], states[i])
                    per_row.append(f[0])
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        return [pipe.to_uint8(f) for f in per_row]

    @torch.no_grad()
    def _step(self):
        self._heavy_left = self.heavy_per_step
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
                s.latents = kept_latents(s.latents, self.cache.cached_frames(i), c.model.frame_cond)
        states = None if self._stateless_vae else [s.vae_state for s in rows]
        u8 = self._decode(x0, states)
        if states is not None:
            for s, st in zip(rows, states):
                s.vae_state = st
        ms = (time.perf_counter() - t0) * 1000
        self.steps += 1
        self.batch_sizes.append(n)
        self.step_ms.append(ms)
        self.step_model.observe(n, ms)
        done = self.last_step_done = time.monotonic()
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
