"""`streamgen serve --replicas N` on Ray Serve (server/cluster*.py).

The Ray tests run a local Ray instance on loopback (2 CPUs, no dashboard) with 2 model
replicas x 1 CPU of tiny-world with random weights, ``max_sessions=2`` each and
``admission="degrade"`` (so a replica's limit is exactly 2 sessions on any machine), and talk
to it with an independent protocol client (the ``websockets`` library and the 24-byte frame
header unpacked here with ``struct``; no server code). They are skipped, with the reason, when
Ray Serve is not installed (``pip install 'streamgen[cluster]'``; scripts/setup.sh installs it).
The placement, metrics, CLI and in-process ingress tests need no Ray (the last one runs the
ingress's app over two in-process replicas behind a real uvicorn server).

``STREAMGEN_TEST_RAY_ADDRESS=HOST:PORT`` runs the Ray tests on an already running local
instance instead of starting one; ``STREAMGEN_TEST_RESTART_S`` bounds the wait for Ray to
restart a killed replica (default 180 s: a model load on a busy machine).
"""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import signal
import socket
import struct
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("websockets")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from streamgen.server.cluster_ingress import merge_metrics  # noqa: E402
from streamgen.server.cluster_replica import ModelReplica, ReplicaSpec  # noqa: E402
from streamgen.server.cluster_tunnel import choose  # noqa: E402


def _have_ray_serve() -> bool:
    spec = importlib.util.find_spec("ray")               # does not import ray
    return spec is not None and any(os.path.isdir(os.path.join(p, "serve")) for p in spec.submodule_search_locations)


HAVE_RAY = _have_ray_serve()
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray Serve is not installed (pip install 'streamgen[cluster]')")

LIMIT = 2                                       # sessions per replica
HEADER = struct.Struct("<4sBBHIIII")
APP = dict(max_sessions=LIMIT, pace=1.0, admission="degrade", calibrate=False, stats_interval=0.5,
           health_stall_s=60.0)             # a loaded test machine may step slowly; that is not a fault here


# ---------------------------------------------------------------------------- an independent client
class Client:
    """Speaks streamgen-stream/1 from the spec: JSON text out, JSON text + binary frames in."""

    def __init__(self, ws):
        self.ws = ws
        self.ready = None
        self.frames: list[int] = []
        self.texts: list[dict] = []
        self.end = None
        self.close_code = None

    @classmethod
    async def connect(cls, url: str):
        return cls(await connect(url, open_timeout=60, max_size=1 << 24))

    async def start(self, prompt: str, seed: int, timeout: float = 60):
        await self.ws.send(json.dumps({"type": "start", "prompt": prompt, "seed": seed, "start": "noise"}))
        t_end = time.monotonic() + timeout
        while self.ready is None:
            m = await self.next(t_end - time.monotonic())
            if m is None or (isinstance(m, dict) and m["type"] in ("error", "end")):
                return m
        return self.ready

    async def next(self, timeout: float):
        """One message (dict for JSON, int frame index for media); None once closed."""
        try:
            msg = await asyncio.wait_for(self.ws.recv(), max(0.01, timeout))
        except ConnectionClosed as e:
            self.close_code = e.rcvd.code if e.rcvd else None
            return None
        if isinstance(msg, bytes):
            magic, kind, _flags, _r, frame, _seq, _chunk, _ms = HEADER.unpack_from(msg)
            assert magic == b"SGF1" and kind == 1 and msg[HEADER.size:HEADER.size + 2] == b"\xff\xd8"
            self.frames.append(frame)
            return frame
        m = json.loads(msg)
        self.texts.append(m)
        if m["type"] == "ready":
            self.ready = m
        elif m["type"] == "end":
            self.end = m
        return m

    async def frames_until(self, n: int, timeout: float = 60) -> int:
        """Read until ``n`` more frames arrived (or the stream ended); returns how many did."""
        want, t_end = len(self.frames) + n, time.monotonic() + timeout
        while len(self.frames) < want and time.monotonic() < t_end:
            m = await self.next(t_end - time.monotonic())
            if m is None or (isinstance(m, dict) and m["type"] == "end"):
                break
        return n - max(0, want - len(self.frames))

    async def until_closed(self, timeout: float = 60):
        t_end = time.monotonic() + timeout
        while self.close_code is None and time.monotonic() < t_end:
            try:
                await self.next(t_end - time.monotonic())
            except asyncio.TimeoutError:
                break
        return self.close_code

    async def close(self):
        await self.ws.close()


def replica_of(ready: dict) -> int:
    return int(ready["session"].split("-", 1)[0][1:])      # "r1-s3" -> 1


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------------------- no Ray needed
def test_choose_places_on_most_free_and_refuses_only_when_all_full():
    ok = lambda free: {"status": "ok", "free": free}  # noqa: E731
    assert choose([ok(1), ok(3)], [0, 0], [5, 0]) == 1
    assert choose([ok(2), ok(2)], [0, 0], [1, 0]) == 1, "tie: fewer sockets"
    assert choose([ok(2), ok(2)], [2, 0], [0, 0]) == 1, "sockets placed but not yet started count"
    assert choose([None, {"status": "stalled", "free": 4}, ok(1)], [0, 0, 0], [0, 0, 0]) == 2
    assert choose([ok(0), ok(0)], [0, 0], [0, 0]) is None, "busy only when every replica is full"
    assert choose([ok(0), ok(0)], [0, 0], [3, 1], need_free=False) == 1
    assert choose([ok(2), ok(1)], [0, 0], [0, 0], exclude={0}) == 1
    assert choose([None, None], [0, 0], [0, 0], need_free=False) is None


def test_metrics_merge_totals_and_per_replica():
    r0 = ("# TYPE streamgen_sessions_active gauge\nstreamgen_sessions_active 2\n"
          "# TYPE streamgen_frames_sent_total counter\nstreamgen_frames_sent_total 10\n"
          "# TYPE streamgen_realtime_factor gauge\nstreamgen_realtime_factor 1.5\n"
          "# TYPE streamgen_errors_total counter\nstreamgen_errors_total{code=\"busy\"} 1\n")
    r1 = r0.replace(" 2\n", " 1\n").replace(" 10\n", " 5\n").replace(" 1.5\n", " 0.8\n")
    text = merge_metrics({0: r0, 1: r1}, ["streamgen_cluster_replicas 2"])
    assert metric(text, "streamgen_sessions_active") == 3
    assert metric(text, "streamgen_frames_sent_total") == 15
    assert metric(text, "streamgen_realtime_factor") == 0.8, "the slowest replica"
    assert 'streamgen_errors_total{code="busy"} 2' in text
    assert 'streamgen_replica_sessions_active{replica="1"} 1' in text
    assert 'streamgen_replica_errors_total{replica="0",code="busy"} 1' in text
    assert "# TYPE streamgen_replica_frames_sent_total counter" in text
    assert text.startswith("streamgen_cluster_replicas 2\n")


def test_serve_replicas_flag_dispatches_and_explains(monkeypatch, capsys):
    from streamgen.errors import ConfigError
    from streamgen.server import cli, cluster
    assert cli.main(["--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err

    def no_ray():
        raise ConfigError(cluster.RAY_MISSING)
    monkeypatch.setattr(cluster, "require_ray", no_ray)
    assert cli.main(["--replicas", "2", "--cpus-per-replica", "1"]) == 2
    assert "pip install 'streamgen[cluster]'" in capsys.readouterr().err


class LocalActor:
    """In-process stand-in for a Ray actor handle of a ModelReplica: ``.m.remote()`` gives an
    awaitable, ``.events.options(...).remote()`` an async iterator of awaitables; ``dead = True``
    makes every call and every next item fail, as after a crash."""

    def __init__(self, obj):
        self.obj, self.dead = obj, False

    def __getattr__(self, name):
        return _LocalMethod(self, name)


class _LocalMethod:
    def __init__(self, actor, name):
        self.actor, self.name = actor, name

    def options(self, **_):
        return self

    def remote(self, *a, **k):
        loop = asyncio.get_running_loop()
        if self.actor.dead:
            f = loop.create_future()
            f.set_exception(ConnectionError("the replica died"))
            return f
        r = getattr(self.actor.obj, self.name)(*a, **k)
        if inspect.isasyncgen(r):
            return _LocalGen(self.actor, r)
        if inspect.iscoroutine(r):
            return asyncio.ensure_future(r)
        f = loop.create_future()
        f.set_result(r)
        return f


class _LocalGen:
    def __init__(self, actor, agen):
        self.actor, self.agen = actor, agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.agen.__anext__()
        f = asyncio.get_running_loop().create_future()
        if self.actor.dead:
            f.set_exception(ConnectionError("the replica died"))
        else:
            f.set_result(item)
        return f


def test_ingress_in_process_spread_replay_loss_drain():
    """The ingress's app over 2 in-process replicas (no Ray): placement, busy replay, a lost
    replica, metrics and drain, through a real uvicorn server and real WebSocket clients."""
    import uvicorn

    from streamgen.server.cluster_ingress import Ingress

    async def go():
        spec = ReplicaSpec("tiny-world", random_weights=True, app_kwargs=APP)
        actors = [LocalActor(ModelReplica(spec, i)) for i in range(2)]
        ing = object.__new__(Ingress)
        await ing.__init__(spec, 2, actors=actors, monitor_s=0.5)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/stream"
        http = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(ing.__serve_build_asgi_app__(), log_level="warning", lifespan="off"))
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.02)
        try:
            async with httpx.AsyncClient(timeout=30) as web:
                clients = await asyncio.gather(*(Client.connect(url) for _ in range(2 * LIMIT)))
                readies = await asyncio.gather(*(c.start(f"room {i}", seed=i) for i, c in enumerate(clients)))
                assert sorted(replica_of(r) for r in readies) == [0] * LIMIT + [1] * LIMIT, readies
                assert await asyncio.gather(*(c.frames_until(3) for c in clients)) == [3] * len(clients)
                extra = await Client.connect(url)
                m = await extra.start("one too many", seed=9)
                assert m["code"] == "busy" and await extra.until_closed(10) == 1013
                pinned = await Client.connect(url)           # pinned to a full replica at connect
                on1 = next(c for c, r in zip(clients, readies) if replica_of(r) == 1)
                await on1.ws.send(json.dumps({"type": "stop"}))
                while on1.end is None:
                    assert await on1.next(20) is not None
                r = await pinned.start("the freed slot", seed=11)
                assert r["type"] == "ready" and replica_of(r) == 1, "start replayed on the replica with room"
                text = (await web.get(http + "/metrics")).text
                assert metric(text, "streamgen_sessions_reserved") == 2 * LIMIT     # rows join at a chunk boundary
                assert metric(text, "streamgen_cluster_replacements_total") == 1
                actors[0].dead = True                         # replica 0 "crashes"
                lost = [c for c, r in zip(clients, readies) if replica_of(r) == 0]
                for c in lost:
                    while c.end is None:
                        assert await c.next(20) is not None
                    assert c.end["reason"] == "replica_lost" and c.end["frames"] >= 3
                    assert await c.until_closed(10) == 1012
                others = [c for c in clients if c not in lost and c is not on1] + [pinned]
                assert await asyncio.gather(*(c.frames_until(3) for c in others)) == [3] * len(others)
                h = await web.get(http + "/healthz")
                assert h.status_code == 200 and h.json()["status"] == "degraded"
                await pinned.close()
                again = await Client.connect(url)
                r = await again.start("after the crash", seed=12)
                assert r["type"] == "ready" and replica_of(r) == 1, "the live replica keeps admitting"
                assert metric((await web.get(http + "/metrics")).text,
                              "streamgen_cluster_replica_lost_sessions_total") == LIMIT
                res = await ing.drain(10.0)
                for c in (others[0], again):
                    while c.end is None:
                        assert await c.next(20) is not None
                    assert c.end["reason"] == "shutdown" and await c.until_closed(10) == 1001
                assert res["sockets_forced"] == 0
                assert (await web.get(http + "/healthz")).status_code == 503
        finally:
            server.should_exit = True
            await serving
            actors[0].dead = False
            await ing.stop_replicas(timeout=1.0)
    asyncio.run(go())


# ---------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance bound to loopback (Ray otherwise binds the node's outward address),
    or the running one named by ``STREAMGEN_TEST_RAY_ADDRESS`` (e.g. a ``ray start --head`` on
    127.0.0.1 with 2 CPUs)."""
    if not HAVE_RAY:
        pytest.skip("Ray Serve is not installed (pip install 'streamgen[cluster]')")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # read at import: node IP = 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")     # slow CI machines
    import ray

    from streamgen.server.cluster import ClusterServer
    address = os.environ.get("STREAMGEN_TEST_RAY_ADDRESS")
    own = {} if address else dict(num_cpus=2, _node_ip_address="127.0.0.1")
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, namespace="streamgen-test",
             configure_logging=False, **own)
    try:
        spec = ReplicaSpec("tiny-world", random_weights=True, cpus=1, app_kwargs=APP)
        srv = ClusterServer(spec, replicas=2, host="127.0.0.1", port=0, name="streamgen-test")
        srv.start()
        yield srv
        srv.stop(drain=False)
    finally:
        ray.shutdown()


@needs_ray
def test_sessions_spread_busy_only_when_all_full(cluster):
    async def go():
        clients = await asyncio.gather(*(Client.connect(cluster.ws_url) for _ in range(2 * LIMIT)))
        readies = await asyncio.gather(*(c.start(f"room {i}", seed=i) for i, c in enumerate(clients)))
        assert all(r and r["type"] == "ready" for r in readies), readies
        assert sorted(replica_of(r) for r in readies) == [0] * LIMIT + [1] * LIMIT
        got = await asyncio.gather(*(c.frames_until(6) for c in clients))
        assert got == [6] * len(clients), "every session streams"
        assert all(c.frames[:6] == list(range(6)) for c in clients)
        text = httpx.get(cluster.url + "/metrics", timeout=30).text
        assert metric(text, "streamgen_sessions_active") == 2 * LIMIT
        assert 'streamgen_replica_sessions_active{replica="0"} 2' in text
        assert 'streamgen_replica_sessions_active{replica="1"} 2' in text
        h = httpx.get(cluster.url + "/healthz", timeout=30)
        assert h.status_code == 200 and h.json()["live_replicas"] == 2 and h.json()["free"] == 0
        extra = await Client.connect(cluster.ws_url)              # every replica full: busy
        m = await extra.start("one too many", seed=9)
        assert m["type"] == "error" and m["code"] == "busy", m
        assert await extra.until_closed(30) == 1013
        # free one slot on replica 1; a socket pinned at connect to (full) replica 0 gets it
        pinned = await Client.connect(cluster.ws_url)
        await asyncio.sleep(0.3)
        on1 = next(c for c, r in zip(clients, readies) if replica_of(r) == 1)
        await on1.ws.send(json.dumps({"type": "stop"}))
        while on1.end is None:
            assert await on1.next(30) is not None
        assert on1.end["reason"] == "stopped"
        r = await pinned.start("the freed slot", seed=11)
        assert r["type"] == "ready" and replica_of(r) == 1, r
        assert await pinned.frames_until(3) == 3
        for c in clients + [pinned]:
            await c.close()
    asyncio.run(go())


async def replica_pids(cluster) -> dict[int, int]:
    """Replica -> pid of the serving ones (the blocking Serve handle call runs off the loop)."""
    return {d["replica"]: d["pid"] for d in await asyncio.to_thread(cluster.describe) if d["status"] == "ok"}


@needs_ray
def test_killed_replica_ends_only_its_sessions_and_is_restarted(cluster):
    async def go():
        t_end = time.monotonic() + 30
        while len(await replica_pids(cluster)) < 2 or httpx.get(cluster.url + "/healthz").json()["sessions"]:
            assert time.monotonic() < t_end, "the previous test's sessions did not end"
            await asyncio.sleep(0.2)
        a, b = await Client.connect(cluster.ws_url), await Client.connect(cluster.ws_url)
        ra, rb = await a.start("first", seed=1), await b.start("second", seed=2)
        assert {replica_of(ra), replica_of(rb)} == {0, 1}, "one session per replica"
        assert await a.frames_until(3) == 3 and await b.frames_until(3) == 3
        victim = replica_of(ra)
        pid = (await replica_pids(cluster))[victim]
        os.kill(pid, signal.SIGKILL)
        while a.end is None:
            assert await a.next(30) is not None, "the lost session gets an end message before the close"
        assert a.end["reason"] == "replica_lost" and a.end["session"] == ra["session"]
        assert await a.until_closed(10) == 1012
        assert await b.frames_until(6) == 6, "the other replica's session keeps streaming"
        c = await Client.connect(cluster.ws_url)
        rc = await c.start("while it restarts", seed=3)
        assert rc["type"] == "ready", rc
        if replica_of(rc) == victim:        # Ray may already have restarted it: then it must be the new process
            assert (await replica_pids(cluster)).get(victim) not in (None, pid), "a new session went to the dead replica"
        assert await c.frames_until(3) == 3
        t_end = time.monotonic() + float(os.environ.get("STREAMGEN_TEST_RESTART_S", 180))   # a model load
        while (await replica_pids(cluster)).get(victim) in (None, pid):
            assert time.monotonic() < t_end, "Ray did not restart the replica"
            await asyncio.sleep(0.5)
        text = httpx.get(cluster.url + "/metrics", timeout=30).text
        assert f'streamgen_cluster_replica_restarts_total{{replica="{victim}"}} 1' in text
        assert metric(text, "streamgen_cluster_replica_lost_sessions_total") == 1
        assert httpx.get(cluster.url + "/healthz").json()["live_replicas"] == 2
        for x in (b, c):
            await x.close()
    asyncio.run(go())


@needs_ray
def test_drain_ends_every_session_with_shutdown(cluster):
    async def go():
        clients = [await Client.connect(cluster.ws_url) for _ in range(2)]
        for i, c in enumerate(clients):
            assert (await c.start(f"drain {i}", seed=i))["type"] == "ready"
        assert {replica_of(c.ready) for c in clients} == {0, 1}
        for c in clients:
            assert await c.frames_until(3) == 3
        res = await asyncio.to_thread(cluster.drain, 10.0)
        assert res["sockets_forced"] == 0, res
        for c in clients:
            while c.end is None:
                assert await c.next(20) is not None
            assert c.end["reason"] == "shutdown" and c.end["frames"] >= 3
            assert await c.until_closed(10) == 1001
        h = httpx.get(cluster.url + "/healthz", timeout=30)
        assert h.status_code == 503 and h.json()["status"] == "draining"
        late = await Client.connect(cluster.ws_url)
        m = await late.next(20)
        assert m["type"] == "error" and m["code"] == "shutting_down"
        assert await late.until_closed(10) == 1001
    asyncio.run(go())
