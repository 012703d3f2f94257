"""The ingress of ``streamgen serve --replicas N``: a Ray Serve FastAPI deployment.

It owns N model replicas (:class:`~.cluster_replica.ModelReplica` Ray actors, restarted by Ray
when they die) and speaks the unchanged stream protocol (PROTOCOL.md) to clients:

- ``/v1/stream``: each WebSocket is tunnelled to ONE replica for its whole life (its session's
  KV cache lives there): the socket is placed on the replica with the most free real-time
  capacity (:func:`choose`); client messages go over as ASGI events, the replica's output
  comes back over a Ray streaming generator. No per-chunk routing. When the chosen replica
  answers a ``start`` with ``busy`` (it filled up meanwhile), the ingress replays that start on
  the next replica with free capacity before the client sees anything; a client gets
  ``busy`` only when every replica is full (or none is up).
- a replica that dies ends its sessions with ``end`` reason ``replica_lost`` and close 1012
  (service restart: reconnect); new sockets go to the live replicas while Ray restarts it.
- ``/healthz``: 200 while at least one replica serves (``ok``, or ``degraded`` when some do not),
  503 when none does or while draining; ``/metrics``: the cluster's totals under the single
  server's names plus every replica's series as ``streamgen_replica_*{replica="i"}``;
  ``/v1/models``, ``/``, ``/static/*``: answered by a live replica.
- :meth:`Ingress.drain` (the CLI's SIGTERM path): every replica drains as the single server does.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
import time
import uuid

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .cluster_replica import ModelReplica, ReplicaSpec
from .cluster_tunnel import Leg, Replica, Tunnel, authorized, choose

PROTOCOL = "streamgen-stream/1"
log = logging.getLogger("streamgen.cluster")


# ---------------------------------------------------------------------------- metrics
def _parse_prometheus(text: str):
    """(types {family: type}, samples [(name, labels_str, value_str)])."""
    types, samples = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        head, _, value = line.rpartition(" ")
        name, brace, labels = head.partition("{")
        samples.append((name, labels[:-1] if brace else "", value))
    return types, samples


def _family(name: str, types: dict) -> str:
    for suffix in ("_count", "_sum", "_bucket"):
        if name.endswith(suffix) and name[:-len(suffix)] in types:
            return name[:-len(suffix)]
    return name


def merge_metrics(per_replica: dict[int, str], own: list[str] | None = None) -> str:
    """Prometheus text of the cluster: ``own`` lines (the ingress's), then for every replica
    metric its cluster total under the same name (counters and gauges: sum; real-time factor:
    min; ``*seconds*``/``*_ms*`` gauges: max; summaries: not totalled), then each replica's
    series renamed ``streamgen_replica_*`` with a ``replica`` label."""
    out = list(own or [])
    totals: dict[tuple[str, str], float] = {}
    order: list[tuple[str, str]] = []
    types_all: dict[str, str] = {}
    per: list[tuple[str, str, str, int]] = []
    for idx in sorted(per_replica):
        types, samples = _parse_prometheus(per_replica[idx])
        types_all.update(types)
        for name, labels, value in samples:
            per.append((name, labels, value, idx))
            typ = types.get(_family(name, types), "untyped")
            if typ not in ("counter", "gauge"):
                continue
            try:
                v = float(value)
            except ValueError:
                continue
            key = (name, labels)
            if key not in totals:
                totals[key] = v
                order.append(key)
            elif v != v:                      # NaN: no value
                continue
            elif totals[key] != totals[key]:
                totals[key] = v
            elif typ == "gauge" and "factor" in name:
                totals[key] = min(totals[key], v)
            elif typ == "gauge" and ("seconds" in name or "_ms" in name):
                totals[key] = max(totals[key], v)
            else:
                totals[key] = totals[key] + v
    seen = set()
    for name, labels in order:
        fam = _family(name, types_all)
        if fam not in seen:
            seen.add(fam)
            out.append(f"# TYPE {fam} {types_all.get(fam, 'untyped')}")
        v = totals[(name, labels)]
        text = "NaN" if v != v else (str(int(v)) if v == int(v) and abs(v) < 2**53 else repr(v))
        out.append(f"{name}{{{labels}}} {text}" if labels else f"{name} {text}")
    seen = set()
    for name, labels, value, idx in per:
        fam = _family(name, types_all)
        new = "streamgen_replica_" + name[len("streamgen_"):] if name.startswith("streamgen_") else "replica_" + name
        if fam not in seen:
            seen.add(fam)
            nfam = "streamgen_replica_" + fam[len("streamgen_"):] if fam.startswith("streamgen_") else "replica_" + fam
            out.append(f"# TYPE {nfam} {types_all.get(fam, 'untyped')}")
        lab = f'replica="{idx}"' + (f",{labels}" if labels else "")
        out.append(f"{new}{{{lab}}} {value}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- the deployment
class Ingress:
    """The Serve deployment class (wrapped by :func:`~.cluster.build_app` with ``serve.ingress()``)."""

    async def __init__(self, spec: ReplicaSpec, replicas: int, token: str | None = None, *,
                 name: str = "streamgen", ready_timeout: float = 900.0, load_timeout: float = 2.0,
                 grace_s: float = 5.0, backpressure_items: int = 8, monitor_s: float = 2.0, actors: list | None = None):
        """``actors``: replica handles to use instead of starting Ray actors (anything with the
        same ``.method.remote()`` / ``.events.options(...).remote()`` surface; tests)."""
        self.spec, self.token = spec, token or None
        self.load_timeout, self.grace_s, self.backpressure = float(load_timeout), float(grace_s), int(backpressure_items)
        self.draining = False
        self.counters: collections.Counter = collections.Counter()
        self.tunnels: set[Tunnel] = set()
        self._poll: asyncio.Future | None = None
        self._polled_at = 0.0
        if actors is None:
            import ray
            tag = uuid.uuid4().hex[:6]
            actor_cls = ray.remote(ModelReplica)
            actors = [actor_cls.options(**spec.actor_options(f"{name}-replica-{i}-{tag}")).remote(spec, i)
                      for i in range(int(replicas))]
        self.replicas = [Replica(i, a) for i, a in enumerate(actors)]
        res = await asyncio.gather(*(asyncio.wait_for(self._ready(r), ready_timeout) for r in self.replicas),
                                   return_exceptions=True)
        up = 0
        for r, x in zip(self.replicas, res):
            if isinstance(x, BaseException):
                r.error = f"{type(x).__name__}: {str(x)[:200]}"
                log.error("replica %d did not start: %s", r.index, r.error)
            else:
                up += x.get("status") == "ok"
        if not up:
            raise RuntimeError("no model replica started: " + "; ".join(r.error or "?" for r in self.replicas))
        log.info("streamgen cluster: %d/%d replicas serving", up, len(self.replicas))
        self._monitor = asyncio.ensure_future(self._watch(float(monitor_s)))

    async def _watch(self, every: float):
        """Poll the replicas in the background: notices restarts (and lets a restarted replica
        start its app) without waiting for the next client."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.poll(max_age=every / 2)
            except Exception:  # pragma: no cover - keep watching
                log.exception("replica poll failed")

    async def _ready(self, r: Replica) -> dict:
        ld = await r.actor.ready.remote()
        r.load, r.pid = ld, ld["pid"]
        return ld

    # ------------------------------------------------------------------ replica state
    async def poll(self, max_age: float = 0.1) -> list:
        """Every replica's load (None: unreachable within ``load_timeout``); concurrent callers
        share one round of calls, and a round younger than ``max_age`` s is reused."""
        if self._poll is not None:
            return await asyncio.shield(self._poll)
        if time.monotonic() - self._polled_at <= max_age:
            return [r.load for r in self.replicas]
        self._poll = asyncio.ensure_future(asyncio.gather(*(self._poll_one(r) for r in self.replicas)))
        try:
            return await asyncio.shield(self._poll)
        finally:
            self._poll = None
            self._polled_at = time.monotonic()

    async def _poll_one(self, r: Replica):
        try:
            ld = await asyncio.wait_for(r.actor.load.remote(), self.load_timeout)
        except Exception as e:
            r.load, r.error = None, f"{type(e).__name__}: {str(e)[:200]}"
            return None
        if r.pid is not None and ld["pid"] != r.pid:
            r.restarts += 1
            self.counters["replica_restarts"] += 1
            log.warning("replica %d restarted (pid %s -> %s)", r.index, r.pid, ld["pid"])
        r.pid, r.load, r.error = ld["pid"], ld, None
        return ld

    def no_replica_message(self) -> str:
        n = len(self.replicas)
        up = sum(1 for r in self.replicas if r.load and r.load.get("status") == "ok")
        if not up:
            return f"no model replica is serving right now (0 of {n} up; restarting); try again shortly"
        return f"every model replica is at its real-time capacity ({up} of {n} up); try again later"

    async def open_leg(self, tunnel: Tunnel, need_free: bool = True, exclude=()) -> Leg | None:
        """Choose a replica (see :func:`choose`) and open a channel on it."""
        exclude = set(exclude)
        client = getattr(tunnel.ws, "client", None)
        client = (client.host, client.port) if client else None
        for _ in range(len(self.replicas)):
            loads = await self.poll()
            now = time.monotonic()
            i = choose(loads, [r.unconfirmed(now, self.grace_s) for r in self.replicas],
                       [len(r.tunnels) + r.opening for r in self.replicas], exclude, need_free=need_free)
            if i is None:
                return None
            r = self.replicas[i]
            cid = uuid.uuid4().hex
            r.opening += 1
            try:
                res = await asyncio.wait_for(r.actor.open.remote(cid, client), self.load_timeout * 5)
            except Exception as e:
                r.load, r.error = None, f"{type(e).__name__}: {str(e)[:200]}"
                exclude.add(i)
                continue
            finally:
                r.opening -= 1
            if not res.get("ok"):
                exclude.add(i)
                continue
            gen = r.actor.events.options(num_returns="streaming",
                                         _generator_backpressure_num_objects=self.backpressure).remote(cid)
            self.counters["placements"] += 1
            return Leg(r, cid, gen)
        return None

    async def replace(self, tunnel: Tunnel) -> Leg | None:
        """The pinned replica refused a start (busy): open the start on another one with room."""
        self._polled_at = 0.0                      # fresh loads
        while True:
            leg = await self.open_leg(tunnel, need_free=True, exclude=tunnel.tried)
            if leg is None:
                return None
            if await tunnel.switch(leg):
                self.counters["replacements"] += 1
                return leg
            tunnel.tried.add(leg.replica.index)

    # ------------------------------------------------------------------ endpoints
    async def health(self) -> tuple[int, dict]:
        loads = await self.poll(max_age=0.0)
        reps, ok = [], 0
        for r, ld in zip(self.replicas, loads):
            st = (ld or {}).get("status") or ("unreachable" if r.error else "starting")
            ok += st == "ok"
            reps.append({"replica": r.index, "status": st, "sessions": (ld or {}).get("sessions", 0),
                         "max_sessions": (ld or {}).get("max_sessions"), "capacity": (ld or {}).get("capacity"),
                         "free": (ld or {}).get("free", 0), "restarts": r.restarts,
                         "realtime_factor": (ld or {}).get("realtime_factor")})
        status = ("draining" if self.draining else "ok" if ok == len(self.replicas)
                  else "degraded" if ok else "down")
        body = {"status": status, "protocol": PROTOCOL, "replicas": reps, "live_replicas": ok,
                "sessions": sum(x["sessions"] or 0 for x in reps),
                "max_sessions": sum(x["max_sessions"] or 0 for x in reps),
                "capacity": sum(x["capacity"] or 0 for x in reps if x["status"] == "ok"),
                "free": sum(x["free"] or 0 for x in reps)}
        if status in ("down", "degraded"):
            body["reason"] = "; ".join(f"replica {x['replica']}: {x['status']}" for x in reps if x["status"] != "ok")
        return (200 if status in ("ok", "degraded") else 503), body

    def own_metrics(self) -> list[str]:
        c = self.counters
        live = sum(1 for r in self.replicas if r.load and r.load.get("status") == "ok")
        lines = [
            "# HELP streamgen_cluster_replicas Model replicas configured / serving.",
            "# TYPE streamgen_cluster_replicas gauge", f"streamgen_cluster_replicas {len(self.replicas)}",
            "# TYPE streamgen_cluster_replicas_live gauge", f"streamgen_cluster_replicas_live {live}",
            "# TYPE streamgen_cluster_sockets gauge", f"streamgen_cluster_sockets {len(self.tunnels)}",
            "# TYPE streamgen_cluster_placements_total counter", f"streamgen_cluster_placements_total {c['placements']}",
            "# HELP streamgen_cluster_replacements_total Starts replayed on another replica after a busy answer.",
            "# TYPE streamgen_cluster_replacements_total counter",
            f"streamgen_cluster_replacements_total {c['replacements']}",
            "# HELP streamgen_cluster_busy_total Sockets refused at the ingress (no replica up).",
            "# TYPE streamgen_cluster_busy_total counter", f"streamgen_cluster_busy_total {c['busy']}",
            "# TYPE streamgen_cluster_replica_lost_sessions_total counter",
            f"streamgen_cluster_replica_lost_sessions_total {c['replica_lost_sessions']}",
            "# TYPE streamgen_cluster_replica_restarts_total counter",
        ]
        lines += [f'streamgen_cluster_replica_restarts_total{{replica="{r.index}"}} {r.restarts}' for r in self.replicas]
        lines += ["# TYPE streamgen_cluster_replica_up gauge"]
        lines += [f'streamgen_cluster_replica_up{{replica="{r.index}"}} '
                  f'{int(bool(r.load and r.load.get("status") == "ok"))}' for r in self.replicas]
        return lines

    async def metrics_text(self) -> str:
        await self.poll(max_age=0.0)
        live = [r for r in self.replicas if r.load is not None]

        async def one(r):
            try:
                status, _, body = await asyncio.wait_for(r.actor.get.remote("/metrics"), self.load_timeout)
                return r.index, body.decode() if status == 200 else None
            except Exception:
                return r.index, None
        texts = {i: t for i, t in await asyncio.gather(*(one(r) for r in live)) if t is not None}
        return merge_metrics(texts, self.own_metrics())

    async def forward_get(self, path: str, query: bytes = b"") -> tuple[int, list, bytes]:
        loads = await self.poll()
        order = sorted(range(len(self.replicas)), key=lambda i: (not (loads[i] and loads[i].get("status") == "ok"), i))
        for i in order:
            if loads[i] is None:
                continue
            try:
                return await asyncio.wait_for(self.replicas[i].actor.get.remote(path, query), self.load_timeout * 5)
            except Exception:
                continue
        body = json.dumps({"type": "error", "code": "unavailable", "message": self.no_replica_message()}).encode()
        return 503, [(b"content-type", b"application/json")], body

    async def drain(self, timeout: float = 10.0) -> dict:
        """Refuse new sockets, drain every replica (flush, ``end`` reason shutdown, close 1001)."""
        self.draining = True
        t_end = time.monotonic() + timeout
        res = await asyncio.gather(*(asyncio.wait_for(r.actor.drain.remote(timeout / 2), timeout)
                                     for r in self.replicas), return_exceptions=True)
        while self.tunnels and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        left = list(self.tunnels)
        for t in left:                           # replicas that did not answer: say goodbye here
            if t.session is not None:
                await t.send_json({"type": "end", "session": t.session, "reason": "shutdown",
                                   "message": "the server is shutting down", "frames": t.frames,
                                   "dropped_frames": t.dropped})
            await t.close(1001, "shutdown")
        return {"replicas": [x if isinstance(x, dict) else {"error": type(x).__name__} for x in res],
                "sockets_forced": len(left)}

    async def stop_replicas(self, timeout: float = 5.0) -> None:
        """Stop every replica's app, then end the actors (no restart)."""
        self._monitor.cancel()
        await asyncio.gather(*(asyncio.wait_for(r.actor.stop.remote(timeout), timeout + 10)
                               for r in self.replicas), return_exceptions=True)
        ray = sys.modules.get("ray")
        for r in self.replicas:
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:           # not a Ray actor, or already gone
                pass

    async def describe(self) -> list[dict]:
        """Per replica: index, pid, node, status, restarts, sockets (operators and tests)."""
        loads = await self.poll(max_age=0.0)
        return [{"replica": r.index, "pid": (ld or {}).get("pid", r.pid), "node": (ld or {}).get("node"),
                 "status": (ld or {}).get("status", "unreachable"), "restarts": r.restarts,
                 "sockets": len(r.tunnels), "sessions": sum(1 for t in r.tunnels if t.session),
                 "load": ld, "error": r.error} for r, ld in zip(self.replicas, loads)]

    # ------------------------------------------------------------------ the ASGI app
    def __serve_build_asgi_app__(self):
        # the route annotations (Request, WebSocket) must resolve in this module's globals:
        # with postponed annotations FastAPI looks them up there
        app = FastAPI(title="streamgen cluster", version=PROTOCOL)

        def denied(request: Request):
            if authorized(self.token, request.headers, request.query_params):
                return None
            return JSONResponse({"type": "error", "code": "unauthorized",
                                 "message": "missing or wrong bearer token (Authorization: Bearer <token> or ?token=)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})

        async def forward(path: str, query: bytes = b""):
            status, headers, body = await self.forward_get(path, query)
            keep = {k.decode().lower(): v.decode() for k, v in headers
                    if k.decode().lower() in ("content-type", "cache-control")}
            return Response(content=body, status_code=status, headers=keep)

        @app.get("/healthz")
        async def healthz():
            code, body = await self.health()
            return JSONResponse(body, status_code=code)

        @app.get("/metrics")
        async def metrics(request: Request):
            if (r := denied(request)) is not None:
                return r
            return PlainTextResponse(await self.metrics_text(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request):
            if (r := denied(request)) is not None:
                return r
            return await forward("/v1/models")

        @app.get("/")
        async def index():
            return await forward("/")

        @app.get("/static/{name}")
        async def static(name: str):
            return await forward("/static/" + name.rsplit("/", 1)[-1])

        @app.websocket("/v1/stream")
        async def stream(ws: WebSocket):
            await ws.accept()
            tunnel = Tunnel(self, ws)
            if not authorized(self.token, ws.headers, ws.query_params):
                await tunnel.send_json({"type": "error", "code": "unauthorized",
                                        "message": "missing or wrong bearer token (Authorization: Bearer <token> or ?token=)"})
                return await tunnel.close(1008, "unauthorized")
            if self.draining:
                await tunnel.send_json({"type": "error", "code": "shutting_down", "message": "the server is shutting down"})
                return await tunnel.close(1001, "shutdown")
            self.tunnels.add(tunnel)
            try:
                await tunnel.run()
            finally:
                self.tunnels.discard(tunnel)

        return app
