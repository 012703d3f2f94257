"""One WebSocket connection of the stream protocol (PROTOCOL.md): parsing, one session at a
time, a bounded drop-oldest frame queue, slow-reader eviction.

Every message gets a protocol answer: an error code from the table, or a documented close.
Nothing a client sends raises out of :meth:`Connection.handle` (an unexpected failure is
answered ``bad_request`` and logged as one rate-limited line, no traceback).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from streamgen.io.actions import validate_action
from streamgen.errors import ActionError, PromptError
from streamgen.codecs.text import check_prompt

from .slots import Busy, Chunk, StreamSlot
from .media import HEADER_BYTES, make_encoder

if TYPE_CHECKING:
    from .app import Hub

PROTOCOL = "streamgen-stream/1"
CLOSE_SLOW_READER = 4001            # application close code: the client stopped reading
START_FIELDS = {"type", "prompt", "seed", "codec", "start"}
log = logging.getLogger("streamgen.server")


def _short(value, n: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


class Connection:
    """One WebSocket: protocol parsing, one session at a time, a bounded frame queue."""

    def __init__(self, hub: "Hub", ws: WebSocket):
        self.hub, self.ws = hub, ws
        self.loop = asyncio.get_running_loop()
        self.slot: StreamSlot | None = None
        self.queue: collections.deque = collections.deque()
        self.wake = asyncio.Event()
        self.sender: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()
        self.tokens, self.t_tokens = hub.rate_limit, time.monotonic()
        self.start_tokens, self.t_start_tokens = hub.start_rate, time.monotonic()
        self.last_rate_error = 0.0
        self.closed = False
        self.full_since: float | None = None     # the send queue is at its bound and nothing left it
        self._reset_stats()

    def _reset_stats(self):
        self.dropped = self.sent = 0
        self.sent_window: collections.deque = collections.deque(maxlen=256)
        self.chunk_ms: collections.deque = collections.deque(maxlen=32)
        self.lat_ms: collections.deque = collections.deque(maxlen=256)    # action arrival -> frame sent
        self.action_t: dict[int, float] = {}
        self.last_batch = 0
        self.full_since = None

    # ------------------------------------------------------------------ sending
    async def send_json(self, obj, timeout: float | None = None) -> bool:
        if self.closed or self.ws.application_state != WebSocketState.CONNECTED:
            return False
        try:
            async with self.send_lock:
                await asyncio.wait_for(self.ws.send_text(json.dumps(obj)), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        except Exception:
            self.closed = True
            return False

    async def error(self, code: str, message: str):
        self.hub.counters[f"error_{code}"] += 1
        await self.send_json({"type": "error", "code": code, "message": message})

    async def send_bytes(self, data: bytes):
        async with self.send_lock:
            await self.ws.send_bytes(data)

    # ------------------------------------------------------------------ batcher callbacks (other threads)
    def _callbacks(self, slot_box: list):
        """Callbacks bound to one session: a late chunk or end of an old session never reaches a new one."""
        def on_chunk(ch: Chunk):
            self.loop.call_soon_threadsafe(self._enqueue, slot_box[0], ch)

        def on_end(reason: str, message: str):
            self.loop.call_soon_threadsafe(self._ended, slot_box[0], reason, message)

        def on_error(code: str, message: str):
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.error(code, message)))
        return on_chunk, on_end, on_error

    def _ended(self, slot: StreamSlot, reason: str, message: str):
        if slot is self.slot:
            asyncio.ensure_future(self.finish(reason, message, None))

    def _enqueue(self, slot: StreamSlot, ch: Chunk):
        if slot is not self.slot or slot.closed:
            return
        self.chunk_ms.append(ch.step_ms)
        self.last_batch = ch.batch
        for i in range(ch.frames.shape[0]):
            self.queue.append((ch.first_frame + i, ch.action_seq, ch.chunk_index, ch.done_at, ch.frames[i]))
        while len(self.queue) > self.hub.max_queue_frames:      # drop-oldest: stale frames go first
            self.queue.popleft()
            self.dropped += 1
            self.hub.counters["frames_dropped"] += 1
        self.wake.set()
        if len(self.queue) >= self.hub.max_queue_frames:
            now = time.monotonic()
            if self.full_since is None:
                self.full_since = now
            elif now - self.full_since > self.hub.slow_reader_s:
                self.full_since = None
                self.hub.counters["slow_readers"] += 1
                asyncio.ensure_future(self.finish(
                    "slow_reader", f"the client read no frames for more than {self.hub.slow_reader_s:g} s "
                    "(send queue full); the session is ended and its slot freed", CLOSE_SLOW_READER,
                    flush=False))

    # ------------------------------------------------------------------ session lifecycle
    def _start_mode(self, value) -> str:
        """The opening of a new stream: "noise" or "world" (see PROTOCOL.md); raises ValueError."""
        c = self.hub.pipe.config
        world_ok = c.model.actions.enabled and c.height == c.width
        if value is None:
            return "world" if world_ok and (c.height, c.width) == (64, 64) else "noise"
        if value == "noise":
            return "noise"
        if value == "world":
            if not world_ok:
                raise ValueError("start 'world' needs a world model (an action space and square frames); "
                                 "this model starts from 'noise'")
            return "world"
        raise ValueError(f"start must be 'noise' or 'world', got {_short(value)}")

    async def start(self, msg: dict):
        hub = self.hub
        if self.slot is not None:
            return await self.error("already_started", "this connection already streams; send stop first")
        if hub.draining:
            return await self.error("shutting_down", "the server is shutting down")
        try:
            prompt = check_prompt(msg.get("prompt"), hub.pipe.config.max_prompt_chars)
        except PromptError as e:
            return await self.error("bad_prompt", str(e))
        seed = msg.get("seed")
        if seed is None:
            seed = random.randrange(2**31 - 1)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            return await self.error("bad_request", "seed must be an integer in [0, 2^63-1]")
        codec = msg.get("codec", "jpeg")
        if codec not in ("jpeg", "fmp4"):
            return await self.error("bad_codec", f"codec must be 'jpeg' or 'fmp4', got {_short(codec)}")
        try:
            start = self._start_mode(msg.get("start"))
        except ValueError as e:
            return await self.error("bad_start", str(e))
        unknown = sorted(str(k)[:40] for k in set(msg) - START_FIELDS)
        if unknown:
            return await self.error("bad_request", f"unknown field(s) in start: {', '.join(unknown[:5])}")
        if not self._start_ok():
            hub.counters["rate_limited"] += 1
            return await self.error("rate_limited", f"more than {hub.start_rate:g} session starts per second on "
                                                    "this connection; start again later")
        c = hub.pipe.config
        box: list = [None]
        on_chunk, on_end, on_error = self._callbacks(box)
        try:
            self.encoder = make_encoder(codec, c.width, c.height, c.fps, hub.jpeg_quality)
            slot = hub.batcher.open(prompt, seed, on_chunk, on_end, start=start, on_error=on_error)
        except Busy as e:
            hub.counters["busy"] += 1
            await self.error("busy", str(e))
            return await self.close_ws(1013, "busy")
        box[0] = self.slot = slot
        self.queue.clear()
        self._reset_stats()
        self.codec = codec
        d = hub.pipe.describe()
        b = hub.batcher
        await self.send_json({"type": "ready", "protocol": PROTOCOL, "session": slot.id, "seed": seed,
                              "codec": codec, "fps": c.fps, "width": c.width, "height": c.height,
                              "chunk_frames": d["chunk_frames"], "action_space": d["action_space"],
                              "header_bytes": HEADER_BYTES, "max_message_bytes": hub.max_message_bytes,
                              "trained": hub.pipe.trained, "start": slot.start_source,
                              "realtime_factor": b.realtime_factor(max(1, b.reserved)),
                              "capacity": b.capacity(), "admission": b.admission})
        self.sender = asyncio.ensure_future(self._send_loop(slot))

    async def finish(self, reason: str, message: str, close_code: int | None, flush: bool = True):
        """End the current session: free its row now, flush queued frames (unless the client is
        not reading), send `end`, optionally close."""
        slot = self.slot
        if slot is not None:
            self.hub.batcher.close(slot)
            self.slot = None
            self.wake.set()
            if self.sender is not None:
                if flush:
                    try:
                        await asyncio.wait_for(asyncio.shield(self.sender), 2.0)
                    except Exception:
                        pass
                self.sender.cancel()
                self.sender = None
            self.hub.counters[f"end_{reason}"] += 1
            sent = await self.send_json({"type": "end", "session": slot.id, "reason": reason, "message": message,
                                         "frames": self.sent, "dropped_frames": self.dropped},
                                        timeout=None if flush else 2.0)
            if not sent and not flush:
                return self.abort()
        if close_code is not None:
            await self.close_ws(close_code, reason, timeout=None if flush else 2.0)

    async def close_ws(self, code: int, reason: str, timeout: float | None = None):
        if not self.closed and self.ws.application_state == WebSocketState.CONNECTED:
            self.closed = True
            try:
                async with self.send_lock:
                    await asyncio.wait_for(self.ws.close(code, reason[:100]), timeout)
            except asyncio.TimeoutError:
                self.abort()
            except Exception:
                pass

    def abort(self):
        """Drop the TCP connection of a client that does not read (nothing can be sent to it)."""
        self.closed = True
        abort = self.ws.scope.get("streamgen.abort")
        if abort is not None:
            try:
                abort()
            except Exception:  # pragma: no cover
                pass

    async def _send_loop(self, slot: StreamSlot):
        hub = self.hub
        big = hub.pipe.config.width * hub.pipe.config.height > 256 * 256
        next_stats = time.monotonic() + hub.stats_interval
        try:
            while True:
                timeout = max(0.0, next_stats - time.monotonic())
                if not self.queue and self.slot is slot:
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
                    self.wake.clear()
                if self.queue:
                    index, seq, chunk, done_at, frame = self.queue.popleft()
                    if len(self.queue) < hub.max_queue_frames:
                        self.full_since = None
                    gen_ms = int((time.monotonic() - done_at) * 1000)
                    enc = self.encoder.encode
                    msgs = await asyncio.to_thread(enc, frame, index, seq, chunk, gen_ms) if big else \
                        enc(frame, index, seq, chunk, gen_ms)
                    for m in msgs:
                        await self.send_bytes(m)
                    now = time.monotonic()
                    self.sent += 1
                    self.sent_window.append(now)
                    hub.counters["frames_sent"] += 1
                    if seq is not None and seq in self.action_t:
                        self.lat_ms.append((now - self.action_t.pop(seq)) * 1000)
                        for old in [s for s in self.action_t if s < seq]:
                            self.action_t.pop(old, None)
                elif self.slot is not slot:
                    for m in self.encoder.close():
                        await self.send_bytes(m)
                    return
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + hub.stats_interval
                    await self.send_json(self.stats())
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            # the transport is gone or closed (e.g. keepalive timeout of a client that stopped
            # reading): nothing can reach the client, so free the session's slot now
            self.closed = True
            if self.slot is slot:
                self.hub.batcher.close(slot)
                self.slot = None
                self.hub.counters["end_transport_closed"] += 1
        except asyncio.CancelledError:
            raise

    def stats(self) -> dict:
        now = time.monotonic()
        recent = [t for t in self.sent_window if now - t <= 2.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 and recent[-1] > recent[0] else 0.0
        lat = sorted(self.lat_ms)
        b = self.hub.batcher
        return {"type": "stats", "session": self.slot.id if self.slot else None, "fps": round(fps, 2),
                "frames_sent": self.sent, "dropped_frames": self.dropped, "queue_depth": len(self.queue),
                "max_queue_frames": self.hub.max_queue_frames,
                "chunk_latency_ms": round(sum(self.chunk_ms) / len(self.chunk_ms), 2) if self.chunk_ms else None,
                "action_latency_ms_p50": round(lat[len(lat) // 2], 2) if lat else None,
                "batch": self.last_batch, "sessions": b.active, "max_sessions": b.max_sessions,
                "capacity": b.capacity(), "realtime_factor": b.realtime_factor()}

    # ------------------------------------------------------------------ receiving
    def _start_ok(self) -> bool:
        """Session starts cost real work (encode, opening chunk): at most ``start_rate``/s (burst as many)."""
        now, rate = time.monotonic(), self.hub.start_rate
        self.start_tokens = min(max(1.0, rate), self.start_tokens + (now - self.t_start_tokens) * rate)
        self.t_start_tokens = now
        if self.start_tokens >= 1:
            self.start_tokens -= 1
            return True
        return False

    def _rate_ok(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.hub.rate_limit, self.tokens + (now - self.t_tokens) * self.hub.rate_limit)
        self.t_tokens = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    async def handle(self, text: str | None, data: bytes | None):
        """One client message -> at most one reply; never raises for anything the client sent."""
        try:
            await self._handle(text, data)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.hub.note_refusal(f"unexpected failure on a client message: {type(e).__name__}: {str(e)[:120]}")
            await self.error("bad_request", "the server could not process this message")

    async def _handle(self, text: str | None, data: bytes | None):
        hub = self.hub
        hub.counters["messages"] += 1
        if not self._rate_ok():
            hub.counters["rate_limited"] += 1
            if time.monotonic() - self.last_rate_error > 1.0:
                self.last_rate_error = time.monotonic()
                await self.error("rate_limited", f"more than {hub.rate_limit:g} messages/s; extra messages are dropped")
            return
        if data is not None or text is None:
            return await self.error("bad_message", "binary messages are not part of the protocol; send JSON text")
        size = len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > hub.max_message_bytes else len(text)
        if size > hub.max_message_bytes:
            return await self.error("too_large", f"message of {size} bytes exceeds the {hub.max_message_bytes}-byte limit")
        try:
            msg = json.loads(text)
        except json.JSONDecodeError as e:
            return await self.error("bad_json", f"message is not valid JSON: {e.msg} at character {e.pos}")
        except (ValueError, RecursionError) as e:      # e.g. an integer over Python's 4300-digit limit, deep nesting
            return await self.error("bad_json", f"message is not valid JSON for this server: {str(e)[:100]}")
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return await self.error("bad_json", 'a message must be a JSON object with a string "type"')
        typ = msg["type"]
        if typ == "start":
            return await self.start(msg)
        if typ not in ("action", "prompt", "stop"):
            return await self.error("unknown_type", f"unknown message type {_short(typ)}; "
                                                    "expected start, action, prompt or stop")
        if self.slot is None:
            return await self.error("not_started", f"send a start message before {typ!r}")
        if typ == "action":
            return await self.action(msg)
        if typ == "prompt":
            try:
                prompt = check_prompt(msg.get("prompt"), hub.pipe.config.max_prompt_chars)
            except PromptError as e:
                return await self.error("bad_prompt", str(e))
            hub.batcher.set_prompt(self.slot, prompt)
            return
        await self.finish("stopped", "stopped by the client", None)

    async def action(self, msg: dict):
        seq = msg.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 0xFFFFFFFF):
            return await self.error("bad_action", "seq must be an integer in [0, 2^32-2]")
        body = {k: v for k, v in msg.items() if k not in ("type", "seq")}
        if "frame" in body:
            return await self.error("bad_action", "unknown action field(s): frame")
        try:
            act = validate_action(self.hub.pipe.config.model.actions, body)
        except ActionError as e:
            return await self.error("bad_action", str(e)[:300])
        if seq is not None:
            self.action_t[seq] = time.monotonic()
            if len(self.action_t) > 1024:
                self.action_t.pop(next(iter(self.action_t)))
        self.hub.batcher.set_action(self.slot, act, seq)

    async def run(self):
        ws = self.ws
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                await self.handle(msg.get("text"), msg.get("bytes"))
                if self.closed:
                    break
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass
        finally:
            self.closed = True
            if self.slot is not None:                 # disconnect: free the row at once
                self.hub.batcher.close(self.slot)
                self.slot = None
            if self.sender is not None:
                self.sender.cancel()
