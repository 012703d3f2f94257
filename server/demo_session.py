"""The demo's per-tab state and streams (used by :mod:`streamgen.server.demo`).

A :class:`TabState` holds one browser tab's latest inputs and its running :class:`Stream`; a
stream owns an engine ``Session`` and a worker thread that generates chunks ahead into a small
bounded queue, reading the tab's inputs at every chunk boundary.
"""
from __future__ import annotations

import collections
import math
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .demo import DemoApp

DRAG_GAIN = 2.0          # dragging across the full video width = mouse 2.0 (clamped to the range)


class Stream:
    """One running stream: an engine session, a generating worker thread and a frame queue."""

    def __init__(self, app: "DemoApp", tab: "TabState", prompt: str, seed: int):
        self.app, self.tab = app, weakref.proxy(tab)
        self.pipe = app.pipe
        self.seed = int(seed)
        self.session = self.pipe.session(prompt, seed=self.seed)   # raises on a bad prompt
        self.prompt = self.session.prompt
        d = app.info
        self.fps = float(d["fps"])
        self.chunk_frames = int(d["chunk_frames"])
        self.q: queue.Queue = queue.Queue(maxsize=max(2 * self.chunk_frames, 4))
        self.stop_evt = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        # recording for the MP4 download (bounded by bytes; oldest frames dropped first)
        self.recorded: collections.deque = collections.deque()
        self.recorded_bytes = 0
        self.dropped_from_recording = 0
        # stats
        self.t_start = time.perf_counter()
        self.first_frame_s: float | None = None
        self.chunks = 0
        self.frames_generated = 0
        self.frames_shown = 0
        self.last_latency = 0.0
        self.ema_latency: float | None = None
        self.gen_time = 0.0
        self.switches = 0
        self.last_action: dict | None = None
        self.actions: collections.deque = collections.deque(maxlen=256)   # (chunk, action) applied
        self.shown_times: collections.deque = collections.deque(maxlen=64)
        self.last_pull = time.monotonic()
        self.idle_released = False
        self.tab_hash = tab.session_hash
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"streamgen-demo-{id(self):x}")
        self.thread.start()

    # worker ------------------------------------------------------------------
    def _run(self):
        try:
            while not self.stop_evt.is_set():
                action, prompt = self.tab.next_inputs()
                if prompt is not None and prompt != self.session.prompt:
                    with self.app.pipe_lock:
                        self.session.set_prompt(prompt)
                    self.prompt = self.session.prompt
                    self.switches += 1
                t0 = time.perf_counter()
                with self.app.pipe_lock:
                    frames = self.session.step(action if self.app.has_actions else None)
                dt = time.perf_counter() - t0
                with self.lock:
                    self.chunks += 1
                    self.frames_generated += len(frames)
                    self.last_latency = dt
                    self.gen_time += dt
                    self.ema_latency = dt if self.ema_latency is None else 0.7 * self.ema_latency + 0.3 * dt
                    self.last_action = action
                    if action["keys"] or any(action["mouse"]):
                        self.actions.append((self.chunks - 1, action))
                    self._record(frames)
                for i, f in enumerate(frames):
                    item = (f, i == 0)
                    while not self.stop_evt.is_set():
                        try:
                            self.q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            if time.monotonic() - self.last_pull > self.app.idle_timeout:
                                self.idle_released = True
                                self.stop_evt.set()     # nobody is watching: free the session
                    if self.stop_evt.is_set():
                        break
        except ReferenceError:      # the tab state is gone
            pass
        except BaseException as e:  # surfaced to the tab by the event generator
            self.error = e
        finally:
            self.session.close()
            self.done.set()
            if self.idle_released:  # the tab is gone without an unload: drop it from the registry
                self.app.forget_tab(self.tab_hash, self)

    def _record(self, frames: np.ndarray):
        self.recorded.append(frames)
        self.recorded_bytes += frames.nbytes
        while self.recorded_bytes > self.app.max_record_bytes and len(self.recorded) > 1:
            old = self.recorded.popleft()
            self.recorded_bytes -= old.nbytes
            self.dropped_from_recording += len(old)

    # control -----------------------------------------------------------------
    def stop(self, wait: float = 0.0):
        self.stop_evt.set()
        if wait:
            self.thread.join(wait)

    @property
    def running(self) -> bool:
        return not self.stop_evt.is_set() and not self.done.is_set()

    def frame_period(self) -> float:
        """Display period: the model's fps, or the generation rate when that is slower."""
        per = 1.0 / self.fps
        if self.ema_latency is not None:
            per = max(per, self.ema_latency / self.chunk_frames)
        return per

    def stats(self) -> dict[str, Any]:
        with self.lock:
            lat = self.ema_latency or 0.0
            gen_fps = self.chunk_frames / lat if lat > 0 else 0.0
            st = list(self.shown_times)
            shown_fps = (len(st) - 1) / (st[-1] - st[0]) if len(st) > 2 and st[-1] > st[0] else 0.0
            return {
                "running": self.running, "seed": self.seed, "prompt": self.prompt,
                "chunks": self.chunks, "frames_generated": self.frames_generated,
                "frames_shown": self.frames_shown, "generated_fps": gen_fps, "shown_fps": shown_fps,
                "chunk_latency_ms": 1000 * self.last_latency, "chunk_latency_avg_ms": 1000 * lat,
                "first_frame_s": self.first_frame_s, "realtime_x": gen_fps / self.fps,
                "switches": self.switches, "last_action": self.last_action,
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            }


class TabState:
    """What one browser tab owns: its latest inputs, prompt and running stream (kept in gr.State)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.keys: list[str] = []          # keys held (keyboard / on-screen buttons)
        self.turn = [0.0, 0.0]             # held turn rate (arrow keys / turn buttons)
        self.drag_total = [0.0, 0.0]       # cumulative drag from the page (robust to dropped events)
        self.drag_used = [0.0, 0.0]
        self.pulses: list[dict] = []       # one-chunk actions from button clicks / the API
        self.pending_prompt: str | None = None
        self.stream: Stream | None = None
        self.last_stream: Stream | None = None
        self.space: dict | None = None
        self.session_hash: str | None = None

    def __deepcopy__(self, memo):
        # gr.State gives every browser session a deep copy of its initial value: a fresh tab.
        return TabState()

    # inputs ------------------------------------------------------------------
    def set_input(self, data: dict):
        with self._lock:
            if "keys" in data:
                self.keys = [str(k).upper() for k in data.get("keys") or []]
            if "turn" in data:
                self.turn = [float(v) for v in data["turn"]][:2]
            if "drag" in data:
                self.drag_total = [float(v) for v in data["drag"]][:2]

    def pulse(self, action: dict):
        with self._lock:
            self.pulses.append(action)

    def switch_prompt(self, prompt: str):
        with self._lock:
            self.pending_prompt = prompt

    def next_inputs(self) -> tuple[dict, str | None]:
        """The action for the next chunk (held keys + turn + drag since last chunk + clicks)."""
        with self._lock:
            space = self.space or {"keys": [], "mouse": False, "mouse_range": 1.0}
            keys = list(self.keys)
            mouse = [self.turn[0], self.turn[1]]
            for i in range(2):
                mouse[i] += DRAG_GAIN * (self.drag_total[i] - self.drag_used[i])
            self.drag_used = list(self.drag_total)
            for p in self.pulses:
                keys += p.get("keys", [])
                m = p.get("mouse", [0.0, 0.0])
                mouse = [mouse[0] + m[0], mouse[1] + m[1]]
            self.pulses = []
            prompt, self.pending_prompt = self.pending_prompt, None
        keys = [k for k in dict.fromkeys(keys) if k in space["keys"]]
        r = float(space.get("mouse_range", 1.0))
        mouse = [max(-r, min(r, m)) if math.isfinite(m) else 0.0 for m in mouse] if space["mouse"] else [0.0, 0.0]
        return {"keys": keys, "mouse": [round(m, 4) for m in mouse]}, prompt

    # lifecycle ---------------------------------------------------------------
    def close(self):
        s, self.stream = self.stream, None
        if s is not None:
            s.stop()
            self.last_stream = s
