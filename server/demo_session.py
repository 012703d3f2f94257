"""The demo's per-tab state and streams (used by :mod:`streamgen.server.demo`).

A :class:`TabState` holds one browser tab's latest inputs and its running :class:`Stream`; a
stream owns an engine ``Session`` and a worker thread that generates chunks ahead into a small
bounded queue, reading the tab's inputs at every chunk boundary. For world models the stream
also steps the built-in world (:class:`streamgen.world.episodes.WorldSession`) with the same
look, seed and actions: the ground truth shown beside the model, frame for frame.
"""
from __future__ import annotations

import collections
import math
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


DRAG_GAIN = 2.0          # dragging across the full video width = mouse 2.0 (clamped to the range)
START_SOURCES = {"world": "world renderer", "noise": "noise"}
DOWNLOADS = ("nearest", "lanczos", "native")
TIME_WORDS = {"dawn": "at dawn", "day": "in daylight", "dusk": "at dusk", "night": "at night"}
WEATHER_WORDS = {"clear": "clear air", "hazy": "light haze", "foggy": "thick fog"}


def look_prompt(theme: str, time_: str, weather: str) -> str:
    """A prompt naming one of the world's looks (the world models were trained on these words)."""
    return f"{'an' if theme[0] in 'aeiou' else 'a'} {theme} {TIME_WORDS[time_]}, {WEATHER_WORDS[weather]}"


def describe_config(cfg, source: str, trained: bool, device: str, dtype: str, attn: str) -> dict:
    """``Pipeline.describe()`` from a config, before the weights are loaded."""
    return {"source": source, "trained": trained, "device": device, "dtype": dtype, "attn_backend": attn,
            "height": cfg.height, "width": cfg.width, "fps": cfg.fps,
            "chunk_frames": cfg.sampler.chunk_frames * cfg.temporal_stride,
            "steps": len(cfg.sampler.denoising_steps), "action_space": cfg.model.actions.describe()}


def upscale_factor(h: int, w: int, target: int = 256) -> int:
    """Integer factor that brings a small frame to about ``target`` px (1 for big frames)."""
    return max(1, target // max(h, w))


def upscale(frames: np.ndarray, k: int, how: str = "nearest") -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, kH, kW, 3] (nearest-neighbour or Lanczos)."""
    if k <= 1 or how == "native":
        return frames
    if how == "nearest":
        return np.repeat(np.repeat(frames, k, axis=1), k, axis=2)
    from PIL import Image
    h, w = frames.shape[1:3]
    return np.stack([np.asarray(Image.fromarray(f).resize((w * k, h * k), Image.LANCZOS)) for f in frames])


@dataclass(frozen=True)
class StreamSettings:
    """What a stream needs of the demo: the shared model (one chunk at a time under
    ``pipe_lock``), its description, limits, and whom to tell when an idle stream lets go."""

    pipe: Any
    pipe_lock: Any                       # threading.Lock
    info: dict
    world_model: bool
    has_actions: bool
    idle_timeout: float
    max_record_bytes: int
    on_idle_release: Callable[[Any, "Stream"], None]   # (tab session hash, stream)


class Stream:
    """One running stream: an engine session, a generating worker thread and a frame queue."""

    def __init__(self, settings: StreamSettings, tab: "TabState", prompt: str, seed: int, start: str = "noise"):
        from streamgen.cli import start_chunk_frames
        from streamgen.codecs.text import check_prompt
        if start not in START_SOURCES:
            raise ValueError(f"start must be one of {', '.join(START_SOURCES)}, got {start!r}")
        self.settings, self.tab = settings, weakref.proxy(tab)
        self.pipe = pipe = settings.pipe
        c = pipe.config
        self.seed = int(seed)
        prompt = check_prompt(prompt, c.max_prompt_chars)          # raises on a bad prompt
        self.start = start
        self.start_source = START_SOURCES[start]
        self.opening: np.ndarray | None = None
        self.world = None                                           # the ground truth (world models)
        if settings.world_model:
            from streamgen.world.episodes import WorldSession, opening_frames
            if start == "world":
                self.opening, self.world = opening_frames(prompt, self.seed, start_chunk_frames(pipe), c.height)
            else:
                self.world = WorldSession(prompt, self.seed, size=c.height, chunk=1, pose="view")
        with settings.pipe_lock:                                         # opening frames run the model
            self.session = pipe.session(prompt, seed=self.seed, start=self.opening)
        self.prompt = self.session.prompt
        d = settings.info
        self.fps = float(d["fps"])
        self.chunk_frames = int(d["chunk_frames"])
        self.n_open = 0 if self.opening is None else len(self.opening)
        self.q: queue.Queue = queue.Queue(maxsize=max(2 * self.chunk_frames, 4, self.n_open + 1))
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
        self.frames_generated = 0          # by the model (opening frames not included)
        self.frames_shown = 0
        self.last_latency = 0.0
        self.ema_latency: float | None = None
        self.gen_time = 0.0
        self.switches = 0
        self.switched_at: int | None = None    # video frame of the last applied prompt switch
        self.last_action: dict | None = None
        self.actions: collections.deque = collections.deque(maxlen=256)   # (chunk, action) applied
        self.chunk_actions: collections.deque = collections.deque(maxlen=4096)  # every chunk's action
        self.shown_times: collections.deque = collections.deque(maxlen=64)
        self.last_pull = time.monotonic()
        self.idle_released = False
        self.tab_hash = tab.session_hash
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"streamgen-demo-{id(self):x}")
        self.thread.start()

    # worker ------------------------------------------------------------------
    def _world_action(self, action: dict) -> dict:
        from streamgen.world.episodes import ACTION_SPACE
        r = ACTION_SPACE.mouse_range
        return {"keys": [k for k in action["keys"] if k in ACTION_SPACE.keys],
                "mouse": [max(-r, min(r, float(m))) for m in action["mouse"]]}

    def _check_idle(self) -> bool:
        """Nobody pulled frames for ``idle_timeout`` s (the page went away without an unload):
        stop and free the session. True when it did."""
        if time.monotonic() - self.last_pull > self.settings.idle_timeout:
            self.idle_released = True
            self.stop_evt.set()
        return self.idle_released

    def _emit(self, frames: np.ndarray, truth: np.ndarray | None, first_index: int) -> bool:
        """Queue one chunk's frames (with their ground truth); False when the stream stopped."""
        for i, f in enumerate(frames):
            item = (f, None if truth is None else truth[i], i == 0, first_index + i)
            while not self.stop_evt.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    self._check_idle()
            if self.stop_evt.is_set():
                return False
        return True

    def _run(self):
        try:
            if self.opening is not None:
                with self.lock:
                    self._record(self.opening)
                if not self._emit(self.opening, self.opening, 0):
                    return
            while not self.stop_evt.is_set():
                if self._check_idle():      # also when generation is slower than the queue fills
                    break
                action, prompt = self.tab.next_inputs()
                if prompt is not None and prompt != self.session.prompt:
                    with self.settings.pipe_lock:
                        self.session.set_prompt(prompt)
                    if self.world is not None:
                        self.world.set_prompt(prompt)
                    with self.lock:
                        self.prompt = self.session.prompt
                        self.switches += 1
                        self.switched_at = self.n_open + self.frames_generated
                t0 = time.perf_counter()
                with self.settings.pipe_lock:
                    frames = self.session.step(action if self.settings.has_actions else None)
                dt = time.perf_counter() - t0
                if self.stop_evt.is_set():      # stopped meanwhile: the chunk is neither shown nor recorded
                    break
                truth = None
                if self.world is not None:
                    self.world.chunk = len(frames)
                    truth = self.world.step(self._world_action(action))
                with self.lock:
                    first = self.n_open + self.frames_generated
                    self.chunks += 1
                    self.frames_generated += len(frames)
                    self.last_latency = dt
                    self.gen_time += dt
                    self.ema_latency = dt if self.ema_latency is None else 0.7 * self.ema_latency + 0.3 * dt
                    self.last_action = action
                    self.chunk_actions.append(action)
                    if action["keys"] or any(action["mouse"]):
                        self.actions.append((self.chunks - 1, action))
                    self._record(frames)
                if not self._emit(frames, truth, first):
                    break
        except ReferenceError:      # the tab state is gone
            pass
        except BaseException as e:  # surfaced to the tab by the event generator
            self.error = e
        finally:
            self.session.close()
            self.done.set()
            if self.idle_released:  # the tab is gone without an unload: drop it from the registry
                self.settings.on_idle_release(self.tab_hash, self)

    def _record(self, frames: np.ndarray):
        self.recorded.append(frames)
        self.recorded_bytes += frames.nbytes
        while self.recorded_bytes > self.settings.max_record_bytes and len(self.recorded) > 1:
            old = self.recorded.popleft()
            self.recorded_bytes -= old.nbytes
            self.dropped_from_recording += len(old)

    # control -----------------------------------------------------------------
    def stop(self, wait: float = 0.0):
        self.stop_evt.set()
        if wait and self.thread is not threading.current_thread():
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

    def recorded_frames(self) -> int:
        with self.lock:
            return sum(len(b) for b in self.recorded)

    def write_mp4(self, folder: str, how: str = "nearest") -> tuple[str, str]:
        """The frames so far (opening frames first) as an MP4 -> (path, what it holds)."""
        from streamgen.io.video import write_mp4
        if how not in DOWNLOADS:
            raise ValueError(f"download size must be one of {', '.join(DOWNLOADS)}, got {how!r}")
        with self.lock:
            blocks = list(self.recorded)
            dropped = self.dropped_from_recording
        if not blocks:
            raise ValueError("nothing generated yet: wait for the first chunk")
        n = sum(len(b) for b in blocks)
        h, w = blocks[0].shape[1:3]
        k = 1 if how == "native" else upscale_factor(h, w)
        how = "native" if k == 1 else how
        tag = f"{w * k}x{h * k}" + ("" if how == "native" else f"-{how}")
        path = os.path.join(folder, f"streamgen-seed{self.seed}-{n}f-{tag}-{int(time.time() * 1000)}.mp4")
        write_mp4(path, (upscale(b, k, how) for b in blocks), fps=int(self.fps))
        what = {"native": "native size", "nearest": f"{k}x nearest-neighbour upscale",
                "lanczos": f"{k}x Lanczos upscale"}[how]
        desc = f"MP4: {n} frames, {w * k}x{h * k} ({what})"
        if self.n_open and not dropped:
            desc += f"; frames 0-{self.n_open - 1} are the {self.start_source}'s opening frames"
        if dropped:
            desc += f"; the oldest {dropped} frames were dropped (recording limit)"
        return path, desc

    def stats(self) -> dict[str, Any]:
        with self.lock:
            lat = self.ema_latency or 0.0
            gen_fps = self.chunk_frames / lat if lat > 0 else 0.0
            st = list(self.shown_times)
            shown_fps = (len(st) - 1) / (st[-1] - st[0]) if len(st) > 2 and st[-1] > st[0] else 0.0
            return {
                "running": self.running, "seed": self.seed, "prompt": self.prompt,
                "chunks": self.chunks, "frames_generated": self.frames_generated,
                "frames": self.n_open + self.frames_generated, "opening_frames": self.n_open,
                "recorded_frames": sum(len(b) for b in self.recorded),
                "start_source": self.start_source,
                "frames_shown": self.frames_shown, "generated_fps": gen_fps, "shown_fps": shown_fps,
                "chunk_latency_ms": 1000 * self.last_latency, "chunk_latency_avg_ms": 1000 * lat,
                "first_frame_s": self.first_frame_s, "realtime_x": gen_fps / self.fps,
                "switches": self.switches, "switched_at": self.switched_at, "last_action": self.last_action,
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            }


class TabRegistry:
    """The tabs that started a stream, by gradio session hash (what ``DemoApp.tabs`` shows).

    A tab joins when it starts a stream (:meth:`attach`) and leaves when its page goes away:
    gradio's unload on heartbeat disconnect (:meth:`unload`), its stream's event generator
    closed by gradio because the client disconnected, the idle watchdog (:meth:`forget`), or the
    deletion of its state (:meth:`deleted`). An unloaded session is remembered (the last
    ``remember`` of them), so an event of its page still in flight when the page closed (the
    blur's input update, a click, a Start) can neither register it again nor start a stream."""

    def __init__(self, remember: int = 4096):
        self.tabs: dict[str, TabState] = {}
        self.lock = threading.Lock()
        self.unloaded: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.remember = int(remember)

    def _gone(self, tab: "TabState") -> bool:           # under self.lock
        if tab.session_hash and tab.session_hash in self.unloaded:
            tab.closed = True
        return tab.closed

    def register(self, tab: "TabState") -> bool:
        """List ``tab`` under its session hash; False when its page is gone (nothing listed)."""
        with self.lock:
            if self._gone(tab):
                return False
            if tab.session_hash:
                self.tabs[tab.session_hash] = tab
            return True

    def attach(self, tab: "TabState", stream: Stream) -> bool:
        """Make ``stream`` the tab's running stream, unless its page went away meanwhile: then
        the stream is stopped and False returned (``unload`` cannot have seen it)."""
        with self.lock:
            ok = not self._gone(tab)
            if ok:
                tab.stream = tab.last_stream = stream
                if tab.session_hash:
                    self.tabs[tab.session_hash] = tab
        if not ok:
            stream.stop()
        return ok

    def unload(self, session_hash: str | None):
        """The page of ``session_hash`` went away: drop its tab for good and stop its stream."""
        if not session_hash:
            return
        with self.lock:
            self.unloaded[session_hash] = None
            self.unloaded.move_to_end(session_hash)
            while len(self.unloaded) > self.remember:
                self.unloaded.popitem(last=False)
            tab = self.tabs.pop(session_hash, None)
            if tab is not None:
                tab.closed = True
        if tab is not None:
            tab.close()

    def forget(self, session_hash: str | None, stream: Stream | None):
        """Drop a tab whose ``stream`` ended because its client went away (the event generator
        was closed, or the idle watchdog released it), unless the tab runs a newer stream."""
        if not session_hash:
            return
        with self.lock:
            tab = self.tabs.get(session_hash)
            if tab is not None and tab.stream in (stream, None):
                del self.tabs[session_hash]

    def deleted(self, tab: "TabState"):
        """gradio deleted the tab's state: stop its stream and drop it."""
        with self.lock:
            tab.closed = True
            if tab.session_hash and self.tabs.get(tab.session_hash) is tab:
                del self.tabs[tab.session_hash]
        tab.close()


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
        self.closed = False                # its page went away (see TabRegistry): never registered again
        self.show_truth = True             # the ground-truth panel (world models)

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
    def close(self, wait: float = 0.0):
        s, self.stream = self.stream, None
        if s is not None:
            s.stop(wait)
            self.last_stream = s
