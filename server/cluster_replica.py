"""One model replica of ``streamgen serve --replicas N``: a Ray actor around the single-process app.

The replica builds the same FastAPI app as ``streamgen serve`` (:func:`~.app.create_app`: Hub,
Batcher, Connection, media encoders) in its own process, with its own model and its own
batched KV cache, and runs the app's lifespan (calibration, generation thread). It never
listens on a port: the ingress (:mod:`.cluster_ingress`) tunnels each client WebSocket to
it as ASGI events, so protocol validation, admission, pacing, drop policy, encoding, stats
and drain are the single server's code, unchanged:

- :meth:`ModelReplica.open` starts one ASGI ``websocket`` call of the app (a *channel*),
- :meth:`ModelReplica.push` delivers one client event (``websocket.receive`` / ``disconnect``),
- :meth:`ModelReplica.events` is a Ray streaming generator of what the app sends: batches of
  ``("text", str)``, ``("bytes", bytes)``, then one of ``("close", code, reason)``,
  ``("abort", 1006, why)`` (the app dropped a client that stopped reading) or ``("end",)``.

Backpressure runs end to end: the ingress reads the generator only as fast as its client
takes the bytes, the generator pauses (Ray's generator backpressure), the channel's bounded
outbox fills, and the app's own per-session queue drops the oldest frames and, past
``slow_reader_s``, ends the session — exactly as with a slow client of the single server.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("streamgen.cluster")
MARKERS = ("close", "abort", "end")          # the last event of a channel


@dataclass
class ReplicaSpec:
    """What every replica loads and how Ray places it (picklable; sent to each actor)."""

    model: str = "default"
    random_weights: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    cpus: float = 1.0                 # Ray CPUs per replica (also torch threads on CPU)
    gpus: float = 0.0                 # 1 on GPU machines: one replica per GPU
    app_kwargs: dict = field(default_factory=dict)   # create_app() keywords (max_sessions, pace, ...)
    outbox_items: int = 16            # per-channel send buffer (items) between the app and Ray
    linger_s: float = 0.002           # wait this long to batch a chunk's frames into one Ray item

    def actor_options(self, name: str | None = None) -> dict:
        opts = {"num_cpus": self.cpus, "max_restarts": -1, "max_task_retries": 0, "max_concurrency": 4096,
                "scheduling_strategy": "SPREAD"}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        if name:
            opts["name"] = name
        return opts


def free_slots(batcher) -> tuple[int, int]:
    """(free sessions, session limit) of one batcher: the real-time capacity measured by the
    server reliability work (``Batcher.capacity()``) under ``admission="realtime"``, the cache
    rows (``max_sessions``) under ``"degrade"``; minus the sessions it holds or has reserved."""
    rows = int(batcher.max_sessions)
    limit = rows
    if getattr(batcher, "admission", "realtime") != "degrade" and hasattr(batcher, "capacity"):
        limit = max(1, min(rows, int(batcher.capacity())))
    held = int(getattr(batcher, "reserved", batcher.active))
    return max(0, limit - held), limit


# ---------------------------------------------------------------------------- ASGI plumbing
async def asgi_get(app, path: str, query: bytes = b"", headers=()) -> tuple[int, list, bytes]:
    """One in-process HTTP GET through an ASGI app: (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query, "headers": list(headers), "server": ("127.0.0.1", 0),
             "client": ("127.0.0.1", 0), "state": {}}
    status, out_headers, body = [500], [], []
    done = asyncio.Event()
    sent_request = False

    async def receive():
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        if msg["type"] == "http.response.start":
            status[0] = msg["status"]
            out_headers.extend(msg.get("headers", []))
        elif msg["type"] == "http.response.body":
            body.append(msg.get("body", b""))
            if not msg.get("more_body"):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return status[0], out_headers, b"".join(body)


class Lifespan:
    """Runs an ASGI app's lifespan protocol (startup / shutdown) in this event loop."""

    def __init__(self, app):
        self.app = app
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def _expect(self, want: str):
        get = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait({get, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            self._task.result()                    # raises what the app raised
            raise RuntimeError(f"the app's lifespan ended before {want}")
        msg = get.result()
        if msg["type"] != want:
            raise RuntimeError(f"lifespan: {msg.get('message') or msg['type']}")

    async def startup(self):
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.ensure_future(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup.complete")

    async def shutdown(self):
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown.complete")
        await self._task


class Channel:
    """One tunnelled WebSocket: the app's ASGI ``receive``/``send`` backed by bounded queues."""

    def __init__(self, cid: str, outbox_items: int = 16, inbox_items: int = 256):
        self.cid = cid
        self.inbox: asyncio.Queue = asyncio.Queue(inbox_items)
        self.outbox: asyncio.Queue = asyncio.Queue(max(2, outbox_items))
        self.connected = False
        self.closed = False            # close sent, client gone, or aborted: nothing more is sent
        self.task: asyncio.Task | None = None
        self.opened_at = time.monotonic()

    async def receive(self) -> dict:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        msg = await self.inbox.get()
        if msg["type"] == "websocket.disconnect":
            self.closed = True
        return msg

    async def send(self, msg: dict):
        typ = msg["type"]
        if typ == "websocket.accept":
            return                      # the ingress accepted the client's socket already
        if self.closed:
            raise ConnectionError("the tunnelled WebSocket is closed")
        if typ == "websocket.send":
            text = msg.get("text")
            await self.outbox.put(("text", text) if text is not None else ("bytes", msg.get("bytes") or b""))
        elif typ == "websocket.close":
            self.closed = True
            await self._final(("close", int(msg.get("code") or 1000), str(msg.get("reason") or "")))

    async def _final(self, marker: tuple, wait: float = 2.0):
        try:
            await asyncio.wait_for(self.outbox.put(marker), wait)
        except asyncio.TimeoutError:        # nobody reads: make room, the marker must get through
            self._force(marker)

    def _force(self, marker: tuple):
        while not self.outbox.empty():
            self.outbox.get_nowait()
        self.outbox.put_nowait(marker)

    def _wake_receiver(self, msg: dict):
        if self.inbox.full():
            self.inbox.get_nowait()
        self.inbox.put_nowait(msg)

    def abort(self):
        """``scope["streamgen.abort"]``: the app drops a client that does not read."""
        if not self.closed:
            self.closed = True
            self._force(("abort", 1006, "the client stopped reading"))
        self._wake_receiver({"type": "websocket.disconnect", "code": 1006})

    def finished(self):
        """The app's handler returned: the stream of events ends here."""
        self.closed = True
        if self.outbox.full():
            self._force(("end",))
        else:
            self.outbox.put_nowait(("end",))


def _app_kwargs(create_app, spec: ReplicaSpec) -> dict:
    """create_app() keywords from the spec, keeping only those this version of create_app takes."""
    params = inspect.signature(create_app).parameters
    kw = {k: v for k, v in spec.app_kwargs.items() if k in params and v is not None}
    dropped = sorted(set(spec.app_kwargs) - set(kw) - {k for k, v in spec.app_kwargs.items() if v is None})
    if dropped:
        log.warning("create_app() does not take %s; ignored", ", ".join(dropped))
    kw.update(random_weights=spec.random_weights, device=spec.device, dtype=spec.dtype)
    kw["token"] = None              # replicas are reachable only through Ray; the ingress authenticates
    return kw


class ModelReplica:
    """The Ray actor (wrapped with ``ray.remote`` by the ingress; async methods: one event loop).

    ``__init__`` loads the model (Ray restarts the actor after a crash and runs it again); the
    app's lifespan (batcher calibration and threads) starts on the first :meth:`ready`,
    :meth:`load` or :meth:`open`.
    """

    def __init__(self, spec: ReplicaSpec, index: int):
        import torch
        self.spec, self.index = spec, int(index)
        self.pid = os.getpid()
        self.created = time.time()
        self.restarted, self.node = False, "local"
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():        # in an actor (unit use: no Ray at all)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
            self.node = ray.util.get_node_ip_address()
        if not spec.gpus:
            torch.set_num_threads(max(1, int(spec.cpus)))
        from .app import create_app
        self.app = create_app(spec.model, **_app_kwargs(create_app, spec))
        self.hub = self.app.state.hub
        self.channels: dict[str, Channel] = {}
        self.state = "loaded"           # loaded -> starting -> ok | failed; ok -> draining -> stopped
        self.error: str | None = None
        self._lifespan = Lifespan(self.app)
        self._starting: asyncio.Task | None = None
        self.channels_opened = 0
        log.info("replica %d (pid %d) loaded %s", self.index, self.pid, spec.model)

    # ------------------------------------------------------------------ lifecycle
    def _kick(self) -> asyncio.Task:
        if self._starting is None:
            self.state = "starting"
            self._starting = asyncio.ensure_future(self._startup())
        return self._starting

    async def _startup(self):
        try:
            await self._lifespan.startup()
            self.state = "ok"
        except Exception as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"[:300]
            log.exception("replica %d failed to start", self.index)

    async def ready(self) -> dict:
        """Wait until the app runs (model loaded, batcher calibrated); then :meth:`load`."""
        await asyncio.shield(self._kick())
        return await self.load()

    async def load(self) -> dict:
        """Placement facts, at once (starting the app in the background if it is not yet)."""
        self._kick()
        d = {"replica": self.index, "pid": self.pid, "node": self.node, "state": self.state,
             "restarted": self.restarted, "channels": self._active(), "created": self.created}
        if self.error:
            d["error"] = self.error
        if self.state not in ("ok", "draining"):
            d.update(status=self.state, free=0)
            return d
        b = self.hub.batcher
        free, limit = free_slots(b)
        status = "draining" if self.state == "draining" else "ok"
        if status == "ok" and hasattr(self.hub, "health"):
            code, body = self.hub.health()
            status = body.get("status", "ok") if code != 200 else "ok"
        d.update(status=status, free=free if status == "ok" else 0, limit=limit, sessions=b.active,
                 reserved=int(getattr(b, "reserved", b.active)), max_sessions=b.max_sessions,
                 capacity=int(b.capacity()) if hasattr(b, "capacity") else b.max_sessions)
        rtf = getattr(b, "realtime_factor", None)
        d["realtime_factor"] = rtf() if callable(rtf) else None
        return d

    async def drain(self, timeout: float = 5.0) -> dict:
        """What SIGTERM does to the single server: refuse new sessions, flush every stream, `end`
        (reason ``shutdown``), close 1001. Waits for the channels to finish (<= ``timeout``)."""
        if self.state == "ok":
            self.state = "draining"
        t_end = time.monotonic() + timeout
        if self.state == "draining":
            try:
                await asyncio.wait_for(self.hub.drain(timeout), timeout + 1.0)
            except asyncio.TimeoutError:
                pass
        while self._active() and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        left = self._active()
        for ch in list(self.channels.values()):     # nobody reads these any more (the ingress is gone)
            if ch.task is not None and not ch.task.done():
                ch.abort()
        return {"replica": self.index, "channels_left": left}

    async def stop(self, timeout: float = 5.0) -> dict:
        """Drain, then run the app's lifespan shutdown (stops the batcher threads)."""
        res = await self.drain(timeout)
        if self.state in ("draining", "ok"):
            await self._lifespan.shutdown()
            self.state = "stopped"
        return res

    # ------------------------------------------------------------------ channels
    async def open(self, cid: str, client: tuple | None = None) -> dict:
        """Start one tunnelled WebSocket; ``{"ok": False, ...}`` if this replica does not serve."""
        await asyncio.shield(self._kick())
        if self.state != "ok":
            return {"ok": False, "replica": self.index, "state": self.state}
        ch = Channel(cid, self.spec.outbox_items)
        scope = {"type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "scheme": "ws", "path": "/v1/stream", "raw_path": b"/v1/stream", "root_path": "",
                 "query_string": b"", "headers": [], "subprotocols": [], "state": {},
                 "server": ("127.0.0.1", 0), "client": tuple(client) if client else ("127.0.0.1", 0),
                 "streamgen.abort": ch.abort}
        self.channels[cid] = ch
        self.channels_opened += 1
        ch.task = asyncio.ensure_future(self._run(ch, scope))
        return {"ok": True, "replica": self.index}

    async def _run(self, ch: Channel, scope: dict):
        try:
            await self.app(scope, ch.receive, ch.send)
        except Exception:
            log.exception("channel %s failed", ch.cid)
        finally:
            ch.finished()          # the channel stays until events() hands out its last item (or 60 s)
            asyncio.get_running_loop().call_later(60.0, self._forget, ch)

    def _forget(self, ch: Channel):
        if self.channels.get(ch.cid) is ch:
            del self.channels[ch.cid]

    def _active(self) -> int:
        return sum(1 for ch in self.channels.values() if ch.task is not None and not ch.task.done())

    async def push(self, cid: str, msg: dict, timeout: float = 10.0) -> bool:
        """One client event into the channel (False when the channel is gone or closed)."""
        ch = self.channels.get(cid)
        if ch is None or (ch.closed and msg["type"] != "websocket.disconnect"):
            return False
        if msg["type"] == "websocket.disconnect":
            ch._wake_receiver(msg)
            return True
        try:
            await asyncio.wait_for(ch.inbox.put(msg), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def events(self, cid: str):
        """Ray streaming generator: what the app sends on this channel, in batches."""
        ch = self.channels.get(cid)
        if ch is None:
            yield [("close", 1011, "unknown channel")]
            return
        while True:
            batch = [await ch.outbox.get()]
            if self.spec.linger_s > 0 and ch.outbox.empty() and batch[0][0] not in MARKERS:
                await asyncio.sleep(self.spec.linger_s)
            while not ch.outbox.empty() and len(batch) < 64:
                batch.append(ch.outbox.get_nowait())
            for i, item in enumerate(batch):
                if item[0] in MARKERS:
                    self._forget(ch)
                    yield batch[:i + 1]
                    return
            yield batch

    async def get(self, path: str, query: bytes = b"") -> tuple[int, list, bytes]:
        """GET through the replica's app (pages, /v1/models, its own /metrics and /healthz)."""
        return await asgi_get(self.app, path, query)

    def describe(self) -> dict:
        b = self.hub.batcher
        return {"replica": self.index, "pid": self.pid, "node": self.node, "state": self.state,
                "restarted": self.restarted, "channels": self._active(),
                "channels_opened": self.channels_opened, "model": self.hub.pipe.describe(),
                "batcher": b.describe() if hasattr(b, "describe") else {}}
