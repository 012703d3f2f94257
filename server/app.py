"""The FastAPI app: WebSocket /v1/stream plus /healthz, /metrics, /v1/models and the browser page.

    app = create_app("tiny-world", random_weights=True, max_sessions=8, token=None)
    uvicorn.run(app, host="127.0.0.1", port=8000, ws_max_size=4 * 65536)

Protocol: see PROTOCOL.md next to this file. The server imports the engine, never the reverse.
The per-connection protocol lives in :mod:`.connection`, the scheduler in :mod:`.batcher`, the
off-thread control path (prompt encodes, admission model) in :mod:`.control`.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import re
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from streamgen.config import PIPELINE_PRESETS, PipelineConfig

from .batcher import Batcher
from .connection import PROTOCOL, Connection

STATIC = os.path.join(os.path.dirname(__file__), "static")
log = logging.getLogger("streamgen.server")
_TOKEN_IN_URL = re.compile(r"(?i)((?:[?&]|%3F|%26)(?:access_)?token(?:=|%3D))[^&\s\"']*")


def redact(text: str) -> str:
    """Replace the value of any ``token=`` query parameter in ``text`` by ``***``."""
    return _TOKEN_IN_URL.sub(r"\1***", text)


class RedactTokens(logging.Filter):
    """Log filter: tokens in URLs (``?token=...``) never reach a log handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "oken" in record.msg:
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


class QuietClientFaults(logging.Filter):
    """Log filter: a client's malformed frame is one warning line, not an error with a traceback
    (uvicorn logs a text frame that is not UTF-8 with ``logger.exception`` before closing 1007)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Invalid UTF-8 sequence received from client"):
            record.msg = "a client sent a text frame that is not UTF-8; closed 1007"
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install_log_redaction():
    """Attach :class:`RedactTokens` and :class:`QuietClientFaults` to the server's loggers (idempotent)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "streamgen.server"):
        lg = logging.getLogger(name)
        for kind in (RedactTokens, QuietClientFaults):
            if not any(isinstance(f, kind) for f in lg.filters):
                lg.addFilter(kind())


class TransportProbe:
    """ASGI middleware: lets a WebSocket handler abort the TCP connection of a client that has
    stopped reading (uvicorn's protocol object, when the server is uvicorn; else nothing)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None and hasattr(transport, "abort"):
                scope["streamgen.abort"] = transport.abort
        await self.app(scope, receive, send)


class Hub:
    """Server-wide state: the pipeline, the batcher, live connections, counters."""

    def __init__(self, pipe, *, max_sessions: int, token: str | None, pace: float, max_message_bytes: int,
                 rate_limit: float, max_queue_frames: int | None, stats_interval: float, jpeg_quality: int,
                 max_stream_frames: int | None, admission: str = "realtime", slow_reader_s: float = 5.0,
                 health_stall_s: float | None = None, calibrate: bool = True, headroom: float = 0.85,
                 prep_duty: float = 0.3, start_rate: float = 4.0):
        self.pipe = pipe
        self.token = token or None
        self.max_message_bytes, self.rate_limit = int(max_message_bytes), float(rate_limit)
        self.start_rate = float(start_rate)
        self.stats_interval, self.jpeg_quality = float(stats_interval), int(jpeg_quality)
        self.batcher = Batcher(pipe, max_sessions=max_sessions, pace=pace, max_stream_frames=max_stream_frames,
                               admission=admission, calibrate=calibrate, headroom=headroom, prep_duty=prep_duty)
        chunk = self.batcher.video_chunk
        self.max_queue_frames = int(max_queue_frames or 2 * chunk)
        self.slow_reader_s = float(slow_reader_s)
        self.health_stall_s = health_stall_s
        self.connections: set[Connection] = set()
        self.draining = False
        self.counters = collections.Counter()
        self.started_at = time.time()
        self._last_note = 0.0
        self._suppressed = 0

    def authorized(self, headers, query) -> bool:
        if self.token is None:
            return True
        given = query.get("token")
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                         self.token.encode("utf-8", "surrogatepass"))

    def note_refusal(self, message: str):
        """One log line for a refused/failed client message, at most one per second (rest counted)."""
        self.counters["refusals_logged"] += 1
        now = time.monotonic()
        if now - self._last_note >= 1.0:
            extra = f" ({self._suppressed} similar in the last second not logged)" if self._suppressed else ""
            log.warning("%s%s", message, extra)
            self._last_note, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def stall_threshold(self) -> float:
        """Seconds without a completed step (sessions active) after which /healthz says 503."""
        b = self.batcher
        base = self.health_stall_s if self.health_stall_s is not None else max(2.0, 6 * b.chunk_period)
        pred = b.step_model.predict(max(1, b.active))
        return max(base, 3 * pred / 1000) if pred else base

    def health(self) -> tuple[int, dict]:
        b = self.batcher
        stalled = b.stalled_for()
        limit = self.stall_threshold()
        prep_busy = time.monotonic() - b.prep.busy_since if b.prep.busy_since else 0.0
        status, reason = "ok", None
        if not b.alive or not b.prep.alive:
            status, reason = "down", "the generation thread is not running"
        elif self.draining:
            status, reason = "draining", "the server is shutting down"
        elif stalled > limit:
            status, reason = "stalled", (f"no generation step completed for {stalled:.1f} s while "
                                         f"{b.active} session(s) are active (limit {limit:.1f} s)")
        elif prep_busy > max(30.0, 10 * limit):
            status, reason = "stalled", f"the control worker (prompt encoder) has been busy for {prep_busy:.0f} s"
        body = {"status": status, "sessions": b.active, "max_sessions": b.max_sessions, "capacity": b.capacity(),
                "realtime_factor": b.realtime_factor(), "seconds_since_step": round(stalled, 2),
                "protocol": PROTOCOL}
        if reason:
            body["reason"] = reason
        return (200 if status == "ok" else 503), body

    def metrics_text(self) -> str:
        b, cnt = self.batcher, self.counters
        steps = sorted(b.step_ms)

        def q(p):
            return steps[min(len(steps) - 1, int(p * len(steps)))] / 1000 if steps else 0

        depths = [len(c.queue) for c in self.connections]
        rtf = b.realtime_factor()
        lines = [
            "# HELP streamgen_sessions_active Sessions holding a cache row.", "# TYPE streamgen_sessions_active gauge",
            f"streamgen_sessions_active {b.active}",
            "# TYPE streamgen_sessions_reserved gauge", f"streamgen_sessions_reserved {b.reserved}",
            "# TYPE streamgen_sessions_max gauge", f"streamgen_sessions_max {b.max_sessions}",
            "# HELP streamgen_capacity_sessions Sessions this machine serves in real time (measured step times).",
            "# TYPE streamgen_capacity_sessions gauge", f"streamgen_capacity_sessions {b.capacity()}",
            "# HELP streamgen_realtime_factor Chunk period / step time at the current batch (< 1: slower than real time).",
            "# TYPE streamgen_realtime_factor gauge", f"streamgen_realtime_factor {rtf if rtf is not None else 'NaN'}",
            "# TYPE streamgen_connections gauge", f"streamgen_connections {len(self.connections)}",
            "# HELP streamgen_model_forwards_total Model forward calls (one per denoising step for all sessions).",
            "# TYPE streamgen_model_forwards_total counter", f"streamgen_model_forwards_total {b.forward_calls}",
            "# TYPE streamgen_steps_total counter", f"streamgen_steps_total {b.steps}",
            "# HELP streamgen_step_seconds Wall time of a batched step (model + decode), recent steps.",
            "# TYPE streamgen_step_seconds summary",
            *(f'streamgen_step_seconds{{quantile="{p}"}} {q(p):.6f}' for p in (0.5, 0.9, 0.99)),
            f"streamgen_step_seconds_count {b.steps}",
            "# HELP streamgen_step_seconds_by_batch Measured step time per batch size (admission model).",
            "# TYPE streamgen_step_seconds_by_batch gauge",
            *(f'streamgen_step_seconds_by_batch{{batch="{n}"}} {ms / 1000:.6f}' for n, ms in b.step_model.table().items()),
            "# TYPE streamgen_seconds_since_step gauge", f"streamgen_seconds_since_step {b.stalled_for():.3f}",
            "# TYPE streamgen_frames_generated_total counter", f"streamgen_frames_generated_total {b.frames_out}",
            "# TYPE streamgen_frames_sent_total counter", f"streamgen_frames_sent_total {cnt['frames_sent']}",
            "# TYPE streamgen_frames_dropped_total counter", f"streamgen_frames_dropped_total {cnt['frames_dropped']}",
            "# HELP streamgen_send_queue_frames Frames waiting in the per-session send queues.",
            "# TYPE streamgen_send_queue_frames gauge",
            f'streamgen_send_queue_frames{{stat="sum"}} {sum(depths)}',
            f'streamgen_send_queue_frames{{stat="max"}} {max(depths, default=0)}',
            "# HELP streamgen_control_queue_sessions Sessions waiting for the control worker (encode / opening).",
            "# TYPE streamgen_control_queue_sessions gauge", f"streamgen_control_queue_sessions {b.prep.depth}",
            "# TYPE streamgen_ready_queue_sessions gauge", f"streamgen_ready_queue_sessions {len(b._ready)}",
            "# TYPE streamgen_sessions_started_total counter", f"streamgen_sessions_started_total {b.sessions_started}",
            "# TYPE streamgen_sessions_admitted_total counter", f"streamgen_sessions_admitted_total {b.admitted}",
            "# TYPE streamgen_sessions_refused_total counter",
            *(f'streamgen_sessions_refused_total{{reason="{r}"}} {b.refused[r]}' for r in ("full", "capacity")),
            "# TYPE streamgen_busy_rejections_total counter", f"streamgen_busy_rejections_total {cnt['busy']}",
            "# TYPE streamgen_slow_reader_ends_total counter", f"streamgen_slow_reader_ends_total {cnt['slow_readers']}",
            "# TYPE streamgen_prompt_switches_total counter", f"streamgen_prompt_switches_total {b.prompt_switches}",
            "# TYPE streamgen_prompt_switches_coalesced_total counter",
            f"streamgen_prompt_switches_coalesced_total {b.prep.coalesced}",
            "# TYPE streamgen_prompt_encodes_total counter", f"streamgen_prompt_encodes_total {b.encodes.misses}",
            "# TYPE streamgen_prompt_encode_cache_hits_total counter",
            f"streamgen_prompt_encode_cache_hits_total {b.encodes.hits}",
            "# TYPE streamgen_last_batch_size gauge",
            f"streamgen_last_batch_size {b.batch_sizes[-1] if b.batch_sizes else 0}",
            "# TYPE streamgen_step_ms_p50 gauge", f"streamgen_step_ms_p50 {b.describe()['step_ms_p50'] or 0}",
            "# TYPE streamgen_errors_total counter",
        ]
        for k, v in sorted(cnt.items()):
            if k.startswith("error_"):
                lines.append(f'streamgen_errors_total{{code="{k[6:]}"}} {v}')
        return "\n".join(lines) + "\n"

    async def drain(self, timeout: float = 5.0):
        """Graceful shutdown: refuse new sessions, flush every stream, say goodbye, close."""
        self.draining = True
        conns = list(self.connections)
        await asyncio.gather(*(c.finish("shutdown", "the server is shutting down", 1001) for c in conns),
                             return_exceptions=True)
        t_end = time.monotonic() + timeout
        while self.connections and time.monotonic() < t_end:
            await asyncio.sleep(0.02)


def _load(pipe_or_model, random_weights: bool, device: str, dtype: str):
    if not isinstance(pipe_or_model, str):
        return pipe_or_model
    from streamgen.engine.pipeline import Pipeline
    return Pipeline.from_pretrained(pipe_or_model, device=device, dtype=dtype, random_weights=random_weights)


def create_app(pipe_or_model="default", *, max_sessions: int = 8, token: str | None = None, pace: float = 1.0,
               random_weights: bool = False, device: str = "cpu", dtype: str = "float32",
               max_message_bytes: int = 65536, rate_limit: float = 200.0, max_queue_frames: int | None = None,
               stats_interval: float = 1.0, jpeg_quality: int = 85, max_stream_frames: int | None = None,
               admission: str = "realtime", slow_reader_s: float = 5.0, health_stall_s: float | None = None,
               calibrate: bool = True, headroom: float = 0.85, prep_duty: float = 0.3,
               start_rate: float = 4.0) -> FastAPI:
    """Build the app around a Pipeline (or a model name to load). The batcher runs during the lifespan.

    ``max_sessions`` bounds the cache rows; ``admission="realtime"`` (default) admits only as many
    sessions as the measured step times serve in real time, ``"degrade"`` admits up to
    ``max_sessions`` and reports the real-time factor (PROTOCOL.md)."""
    pipe = _load(pipe_or_model, random_weights, device, dtype)
    hub = Hub(pipe, max_sessions=max_sessions, token=token, pace=pace, max_message_bytes=max_message_bytes,
              rate_limit=rate_limit, max_queue_frames=max_queue_frames, stats_interval=stats_interval,
              jpeg_quality=jpeg_quality, max_stream_frames=max_stream_frames, admission=admission,
              slow_reader_s=slow_reader_s, health_stall_s=health_stall_s, calibrate=calibrate,
              headroom=headroom, prep_duty=prep_duty, start_rate=start_rate)
    install_log_redaction()

    @asynccontextmanager
    async def lifespan(app):
        install_log_redaction()
        await asyncio.to_thread(hub.batcher.start)       # calibration blocks for a moment
        try:
            yield
        finally:
            if not hub.draining:
                await hub.drain()
            await asyncio.to_thread(hub.batcher.stop)

    app = FastAPI(title="streamgen", version=PROTOCOL, lifespan=lifespan)
    app.add_middleware(TransportProbe)
    app.state.hub = hub

    def denied(request: Request):
        if hub.authorized(request.headers, request.query_params):
            return None
        return JSONResponse({"type": "error", "code": "unauthorized",
                             "message": "missing or wrong bearer token (Authorization: Bearer <token> or ?token=)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz():
        code, body = hub.health()
        return JSONResponse(body, status_code=code)

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
        return PlainTextResponse(hub.metrics_text(), media_type="text/plain; version=0.0.4")

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
            await conn.close_ws(1000, "bye", timeout=2.0)

    return app
