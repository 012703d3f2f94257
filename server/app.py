"""The FastAPI app: WebSocket /v1/stream plus /healthz, /metrics, /v1/models and the browser page.

    app = create_app("tiny-world", random_weights=True, max_sessions=8, token=None)
    uvicorn.run(app, host="127.0.0.1", port=8000, ws_max_size=4 * 65536)

Protocol: see PROTOCOL.md next to this file. The server imports the engine, never the reverse.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import random
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from streamgen.actions import validate_action
from streamgen.config import PIPELINE_PRESETS, PipelineConfig
from streamgen.errors import ActionError, PromptError
from streamgen.text import check_prompt

from .batcher import Batcher, Busy, Chunk, StreamSlot
from .media import HEADER_BYTES, make_encoder

PROTOCOL = "streamgen-stream/1"
STATIC = os.path.join(os.path.dirname(__file__), "static")
log = logging.getLogger("streamgen.server")


class Hub:
    """Server-wide state: the pipeline, the batcher, live connections, counters."""

    def __init__(self, pipe, *, max_sessions: int, token: str | None, pace: float, max_message_bytes: int,
                 rate_limit: float, max_queue_frames: int | None, stats_interval: float, jpeg_quality: int,
                 max_stream_frames: int | None):
        self.pipe = pipe
        self.token = token or None
        self.max_message_bytes, self.rate_limit = int(max_message_bytes), float(rate_limit)
        self.stats_interval, self.jpeg_quality = float(stats_interval), int(jpeg_quality)
        self.batcher = Batcher(pipe, max_sessions=max_sessions, pace=pace, max_stream_frames=max_stream_frames)
        chunk = self.batcher.video_chunk
        self.max_queue_frames = int(max_queue_frames or 2 * chunk)
        self.connections: set["Connection"] = set()
        self.draining = False
        self.counters = collections.Counter()
        self.started_at = time.time()

    def authorized(self, headers, query) -> bool:
        if self.token is None:
            return True
        given = query.get("token")
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def drain(self, timeout: float = 5.0):
        """Graceful shutdown: refuse new sessions, flush every stream, say goodbye, close."""
        self.draining = True
        conns = list(self.connections)
        await asyncio.gather(*(c.finish("shutdown", "the server is shutting down", 1001) for c in conns),
                             return_exceptions=True)
        t_end = time.monotonic() + timeout
        while self.connections and time.monotonic() < t_end:
            await asyncio.sleep(0.02)


class Connection:
    """One WebSocket: protocol parsing, one session at a time, a bounded frame queue."""

    def __init__(self, hub: Hub, ws: WebSocket):
        self.hub, self.ws = hub, ws
        self.loop = asyncio.get_running_loop()
        self.slot: StreamSlot | None = None
        self.queue: collections.deque = collections.deque()
        self.wake = asyncio.Event()
        self.sender: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()
        self.tokens, self.t_tokens = hub.rate_limit, time.monotonic()
        self.last_rate_error = 0.0
        self.closed = False
        self._reset_stats()

    def _reset_stats(self):
        self.dropped = self.sent = 0
        self.sent_window: collections.deque = collections.deque(maxlen=256)
        self.chunk_ms: collections.deque = collections.deque(maxlen=32)
        self.lat_ms: collections.deque = collections.deque(maxlen=256)    # action arrival -> frame sent
        self.action_t: dict[int, float] = {}
        self.last_batch = 0

    # ------------------------------------------------------------------ sending
    async def send_json(self, obj):
        if self.closed or self.ws.application_state != WebSocketState.CONNECTED:
            return
        async with self.send_lock:
            try:
                await self.ws.send_text(json.dumps(obj))
            except Exception:
                self.closed = True

    async def error(self, code: str, message: str):
        self.hub.counters[f"error_{code}"] += 1
        await self.send_json({"type": "error", "code": code, "message": message})

    async def send_bytes(self, data: bytes):
        async with self.send_lock:
            await self.ws.send_bytes(data)

    # ------------------------------------------------------------------ batcher callbacks (worker thread)
    def _on_chunk(self, ch: Chunk):
        self.loop.call_soon_threadsafe(self._enqueue, ch)

    def _enqueue(self, ch: Chunk):
        slot = self.slot
        if slot is None or slot.closed:
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

    def _on_end(self, reason: str, message: str):
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.finish(reason, message, None)))

    # ------------------------------------------------------------------ session lifecycle
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
            return await self.error("bad_request", "seed must be a non-negative integer")
        codec = msg.get("codec", "jpeg")
        if codec not in ("jpeg", "fmp4"):
            return await self.error("bad_codec", f"codec must be 'jpeg' or 'fmp4', got {codec!r}")
        unknown = sorted(set(msg) - {"type", "prompt", "seed", "codec"})
        if unknown:
            return await self.error("bad_request", f"unknown field(s) in start: {', '.join(unknown)}")
        c = hub.pipe.config
        try:
            self.encoder = make_encoder(codec, c.width, c.height, c.fps, hub.jpeg_quality)
            self.slot = hub.batcher.open(prompt, seed, self._on_chunk, self._on_end)
        except Busy as e:
            hub.counters["busy"] += 1
            await self.error("busy", str(e))
            return await self.close_ws(1013, "busy")
        self.queue.clear()
        self._reset_stats()
        self.codec = codec
        d = hub.pipe.describe()
        await self.send_json({"type": "ready", "protocol": PROTOCOL, "session": self.slot.id, "seed": seed,
                              "codec": codec, "fps": c.fps, "width": c.width, "height": c.height,
                              "chunk_frames": d["chunk_frames"], "action_space": d["action_space"],
                              "header_bytes": HEADER_BYTES, "max_message_bytes": hub.max_message_bytes,
                              "trained": hub.pipe.trained})
        self.sender = asyncio.ensure_future(self._send_loop(self.slot))

    async def finish(self, reason: str, message: str, close_code: int | None):
        """End the current session: free its row now, flush queued frames, send `end`."""
        slot = self.slot
        if slot is not None:
            self.hub.batcher.close(slot)
            self.slot = None
            self.wake.set()
            if self.sender is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self.sender), 2.0)
                except Exception:
                    self.sender.cancel()
                self.sender = None
            await self.send_json({"type": "end", "session": slot.id, "reason": reason, "message": message,
                                  "frames": self.sent, "dropped_frames": self.dropped})
        if close_code is not None:
            await self.close_ws(close_code, reason)

    async def close_ws(self, code: int, reason: str):
        if not self.closed and self.ws.application_state == WebSocketState.CONNECTED:
            self.closed = True
            try:
                async with self.send_lock:
                    await self.ws.close(code, reason[:100])
            except Exception:
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
            self.closed = True
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
                "batch": self.last_batch, "sessions": b.active, "max_sessions": b.max_sessions}

    # ------------------------------------------------------------------ receiving
    def _rate_ok(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.hub.rate_limit, self.tokens + (now - self.t_tokens) * self.hub.rate_limit)
        self.t_tokens = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    async def handle(self, text: str | None, data: bytes | None):
        hub = self.hub
        hub.counters["messages"] += 1
        if not self._rate_ok():
            hub.counters["rate_limited"] += 1
            if time.monotonic() - self.last_rate_error > 1.0:
                self.last_rate_error = time.monotonic()
                await self.error("rate_limited", f"more than {hub.rate_limit:g} messages/s; extra messages are dropped")
            return
        if data is not None:
            return await self.error("bad_message", "binary messages are not part of the protocol; send JSON text")
        size = len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > hub.max_message_bytes else len(text)
        if size > hub.max_message_bytes:
            return await self.error("too_large", f"message of {size} bytes exceeds the {hub.max_message_bytes}-byte limit")
        try:
            msg = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            return await self.error("bad_json", f"message is not valid JSON: {getattr(e, 'msg', e)}")
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return await self.error("bad_json", 'a message must be a JSON object with a string "type"')
        typ = msg["type"]
        if typ == "start":
            return await self.start(msg)
        if typ not in ("action", "prompt", "stop"):
            return await self.error("unknown_type", f"unknown message type {typ[:40]!r}; expected start, action, prompt or stop")
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
            return await self.error("bad_action", str(e))
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


def _load(pipe_or_model, random_weights: bool, device: str, dtype: str):
    if not isinstance(pipe_or_model, str):
        return pipe_or_model
    from streamgen.pipeline import Pipeline
    return Pipeline.from_pretrained(pipe_or_model, device=device, dtype=dtype, random_weights=random_weights)


def create_app(pipe_or_model="default", *, max_sessions: int = 8, token: str | None = None, pace: float = 1.0,
               random_weights: bool = False, device: str = "cpu", dtype: str = "float32",
               max_message_bytes: int = 65536, rate_limit: float = 200.0, max_queue_frames: int | None = None,
               stats_interval: float = 1.0, jpeg_quality: int = 85, max_stream_frames: int | None = None) -> FastAPI:
    """Build the app around a Pipeline (or a model name to load). The batcher runs during the lifespan."""
    pipe = _load(pipe_or_model, random_weights, device, dtype)
    hub = Hub(pipe, max_sessions=max_sessions, token=token, pace=pace, max_message_bytes=max_message_bytes,
              rate_limit=rate_limit, max_queue_frames=max_queue_frames, stats_interval=stats_interval,
              jpeg_quality=jpeg_quality, max_stream_frames=max_stream_frames)

    @asynccontextmanager
    async def lifespan(app):
        hub.batcher.start()
        try:
            yield
        finally:
            if not hub.draining:
                await hub.drain()
            await asyncio.to_thread(hub.batcher.stop)

    app = FastAPI(title="streamgen", version=PROTOCOL, lifespan=lifespan)
    app.state.hub = hub

    def denied(request: Request):
        if hub.authorized(request.headers, request.query_params):
            return None
        return JSONResponse({"type": "error", "code": "unauthorized",
                             "message": "missing or wrong bearer token (Authorization: Bearer <token> or ?token=)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz():
        b = hub.batcher
        ok = b._thread is not None and b._thread.is_alive() and not hub.draining
        return JSONResponse({"status": "ok" if ok else "draining" if hub.draining else "down",
                             "sessions": b.active, "max_sessions": b.max_sessions, "protocol": PROTOCOL},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        if (r := denied(request)) is not None:
            return r
        presets = {}
        for name in sorted(PIPELINE_PRESETS):
            c = PipelineConfig.from_name(name)
            presets[name] = {"fps": c.fps, "width": c.width, "height": c.height,
                             "chunk_frames": c.sampler.chunk_frames * c.temporal_stride,
                             "action_space": c.model.actions.describe()}
        return {"protocol": PROTOCOL, "loaded": pipe.describe(), "presets": presets}

    @app.get("/metrics")
    async def metrics(request: Request):
        if (r := denied(request)) is not None:
            return r
        b, cnt = hub.batcher, hub.counters
        lines = [
            "# HELP streamgen_sessions_active Sessions holding a cache row.", "# TYPE streamgen_sessions_active gauge",
            f"streamgen_sessions_active {b.active}",
            "# TYPE streamgen_sessions_max gauge", f"streamgen_sessions_max {b.max_sessions}",
            "# TYPE streamgen_connections gauge", f"streamgen_connections {len(hub.connections)}",
            "# HELP streamgen_model_forwards_total Model forward calls (one per denoising step for all sessions).",
            "# TYPE streamgen_model_forwards_total counter", f"streamgen_model_forwards_total {b.forward_calls}",
            "# TYPE streamgen_steps_total counter", f"streamgen_steps_total {b.steps}",
            "# TYPE streamgen_frames_generated_total counter", f"streamgen_frames_generated_total {b.frames_out}",
            "# TYPE streamgen_frames_sent_total counter", f"streamgen_frames_sent_total {cnt['frames_sent']}",
            "# TYPE streamgen_frames_dropped_total counter", f"streamgen_frames_dropped_total {cnt['frames_dropped']}",
            "# TYPE streamgen_sessions_started_total counter", f"streamgen_sessions_started_total {b.sessions_started}",
            "# TYPE streamgen_busy_rejections_total counter", f"streamgen_busy_rejections_total {cnt['busy']}",
            "# TYPE streamgen_last_batch_size gauge",
            f"streamgen_last_batch_size {b.batch_sizes[-1] if b.batch_sizes else 0}",
            "# TYPE streamgen_step_ms_p50 gauge", f"streamgen_step_ms_p50 {b.describe()['step_ms_p50'] or 0}",
            "# TYPE streamgen_errors_total counter",
        ]
        for k, v in sorted(cnt.items()):
            if k.startswith("error_"):
                lines.append(f'streamgen_errors_total{{code="{k[6:]}"}} {v}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    async def static(name: str):
        path = os.path.join(STATIC, os.path.basename(name))
        if not os.path.isfile(path):
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await ws.accept()
        conn = Connection(hub, ws)
        if not hub.authorized(ws.headers, ws.query_params):
            await conn.error("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token> or ?token=)")
            return await conn.close_ws(1008, "unauthorized")
        hub.connections.add(conn)
        try:
            await conn.run()
        finally:
            hub.connections.discard(conn)
            await conn.close_ws(1000, "bye")

    return app
