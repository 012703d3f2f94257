"""streamgen serve --replicas N [--address auto | ray://HOST:10001] [--cpus-per-replica C] [serve options]

The stream protocol (PROTOCOL.md, ``streamgen-stream/1``) as a Ray Serve application: one
FastAPI ingress deployment (:mod:`.cluster_ingress`) in front of N model replicas
(:mod:`.cluster_replica`: Ray actors, one GPU each with ``--device cuda``, ``--cpus-per-replica``
CPUs otherwise), each running the single server's app with its own model, cache and batcher.
A WebSocket is pinned to one replica for its life; admission picks the replica with the most
free real-time capacity; a dead replica ends only its own sessions (``end`` reason
``replica_lost``) while Ray restarts it; SIGTERM/SIGINT drain every replica as the single
server drains. Needs the optional extra: ``pip install 'streamgen[cluster]'`` (Ray Serve).
See docs/scaling.md.

    with ClusterServer(ReplicaSpec("tiny-world", random_weights=True), replicas=2, port=0) as srv:
        ...  # srv.ws_url, srv.describe(), srv.drain()
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from streamgen.errors import ConfigError

from .cluster_replica import ReplicaSpec

log = logging.getLogger("streamgen.cluster")
APP_KWARGS = ("max_sessions", "pace", "max_message_bytes", "rate_limit", "max_queue_frames", "max_stream_frames",
              "stats_interval", "admission", "slow_reader_s", "health_stall_s", "headroom", "calibrate",
              "start_rate")          # the `streamgen serve` options each replica's create_app() gets
RAY_MISSING = ("`streamgen serve --replicas` needs Ray Serve, which is not installed; install the extra: "
               "pip install 'streamgen[cluster]'  (or: pip install 'ray[serve]')")


def require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise ConfigError(RAY_MISSING) from e


def build_app(spec: ReplicaSpec, replicas: int, token: str | None = None, *, name: str = "streamgen",
              ready_timeout: float = 900.0):
    """The Serve application (bound ingress deployment) for :func:`ray.serve.run`."""
    from ray import serve

    from .cluster_ingress import Ingress
    deployment = serve.deployment(
        name="StreamgenIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,            # every open WebSocket is one ongoing request
        graceful_shutdown_timeout_s=20, graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5, health_check_timeout_s=60,
    )(serve.ingress()(Ingress))
    return deployment.bind(spec, int(replicas), token, name=name, ready_timeout=ready_timeout)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ClusterServer:
    """Start (or join) Ray, run the Serve application, drain and stop it.

    ``address``: None starts a local Ray instance (``ray_init`` keywords: num_cpus, ...);
    ``"auto"`` joins the running cluster; ``"ray://host:10001"`` connects through Ray Client.
    An already initialised Ray (tests, notebooks) is used as it is and left running.
    """

    def __init__(self, spec: ReplicaSpec, replicas: int, *, host: str = "127.0.0.1", port: int = 8000,
                 token: str | None = None, address: str | None = None, name: str = "streamgen",
                 ray_init: dict | None = None, ready_timeout: float = 900.0):
        if int(replicas) < 1:
            raise ConfigError("--replicas must be >= 1")
        if spec.cpus <= 0:
            raise ConfigError("--cpus-per-replica must be > 0")
        self.spec, self.replicas, self.token, self.name = spec, int(replicas), token or None, name
        self.host, self.port = host, int(port) if port else free_port(host)
        self.address, self.ray_init, self.ready_timeout = address, dict(ray_init or {}), ready_timeout
        self.url = f"http://{host}:{self.port}"
        self.ws_url = f"ws://{host}:{self.port}/v1/stream"
        self.handle = None
        self._own_ray = self._own_serve = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ClusterServer":
        require_ray()
        import ray
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "namespace": "streamgen", **self.ray_init}
            if self.address:
                kw.pop("num_cpus", None)
                kw.pop("num_gpus", None)
            ray.init(address=self.address or "local", **kw)     # "local": a new instance, never a stale one
            self._own_ray = True
        try:
            self._start_serve()
        except BaseException:
            if self._own_ray:               # a failed start leaves no Ray instance behind
                ray.shutdown()
            raise
        return self

    def _start_serve(self):
        import ray
        from ray import serve
        self._check_resources(ray.cluster_resources())
        try:
            from ray.serve.context import _get_global_client
            _get_global_client()
            running = True
        except Exception:
            running = False
        if not running:
            for attempt in range(3):        # a slow (cold, loaded) node may miss Serve's 60 s proxy wait
                try:
                    serve.start(http_options={"host": self.host, "port": self.port})
                    break
                except TimeoutError as e:
                    if attempt == 2:
                        raise
                    log.warning("Serve: %s; waiting again", e)
            self._own_serve = True
        self.handle = serve.run(build_app(self.spec, self.replicas, self.token, name=self.name,
                                          ready_timeout=self.ready_timeout),
                                name=self.name, route_prefix="/")

    def _check_resources(self, have: dict):
        need_cpu = self.spec.cpus * self.replicas
        need_gpu = self.spec.gpus * self.replicas
        if need_gpu > have.get("GPU", 0):
            raise ConfigError(f"{self.replicas} replica(s) need {need_gpu:g} GPU(s); the Ray cluster has "
                              f"{have.get('GPU', 0):g}")
        if need_cpu > have.get("CPU", 0):
            raise ConfigError(f"{self.replicas} replica(s) x {self.spec.cpus:g} CPU need {need_cpu:g} CPUs; the Ray "
                              f"cluster has {have.get('CPU', 0):g} (lower --cpus-per-replica or --replicas)")

    def drain(self, timeout: float = 10.0) -> dict:
        """SIGTERM semantics for every replica: no new sessions, flush, `end` (shutdown), close 1001."""
        return self.handle.drain.remote(timeout).result(timeout_s=timeout + 30)

    def describe(self) -> list[dict]:
        return self.handle.describe.remote().result(timeout_s=60)

    def stop(self, drain: bool = True):
        if self._stopped or self.handle is None:
            return
        self._stopped = True
        import ray
        from ray import serve
        try:
            if drain:
                self.drain()
            self.handle.stop_replicas.remote().result(timeout_s=60)
        except Exception as e:  # keep stopping
            log.warning("drain/stop of the replicas failed: %s: %s", type(e).__name__, e)
        try:
            serve.delete(self.name)
        except Exception as e:
            log.warning("serve.delete failed: %s", e)
        if self._own_serve:
            try:
                serve.shutdown()
            except Exception as e:
                log.warning("serve.shutdown failed: %s", e)
        if self._own_ray:
            ray.shutdown()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------- CLI
def spec_from_args(args) -> ReplicaSpec:
    kw = {k: getattr(args, k) for k in APP_KWARGS if getattr(args, k, None) is not None}
    gpus = 1.0 if args.device == "cuda" else 0.0
    return ReplicaSpec(model=args.model, random_weights=bool(args.random_weights), device=args.device,
                       dtype=args.dtype, cpus=float(args.cpus_per_replica), gpus=gpus, app_kwargs=kw)


def main_cluster(args) -> int:
    """``streamgen serve --replicas N ...`` (called by server/cli.py after its checks)."""
    if args.replicas < 1:
        print("error: --replicas must be >= 1", file=sys.stderr)
        return 2
    if args.cpus_per_replica <= 0:
        print("error: --cpus-per-replica must be > 0", file=sys.stderr)
        return 2
    try:
        require_ray()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = None if args.address in (None, "", "local") else args.address
    ray_init = {}
    if address is None:          # a Ray instance of our own: its internals listen on loopback only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")     # (read when ray is imported)
        ray_init["_node_ip_address"] = "127.0.0.1"
    spec = spec_from_args(args)
    srv = ClusterServer(spec, args.replicas, host=args.host, port=args.port, token=args.token,
                        address=address, ray_init=ray_init)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():                     # second signal: stop without waiting for the drain
            os._exit(1)
        print(f"streamgen: {signal.Signals(signum).name}: draining {args.replicas} replica(s)", file=sys.stderr,
              flush=True)
        stop.set()

    t0 = time.monotonic()
    srv.start()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    reps = srv.describe()
    up = sum(1 for r in reps if r["status"] == "ok")
    model = (reps[0].get("load") or {}) if reps else {}
    if args.random_weights:
        print("!! RANDOM WEIGHTS: the model is not trained; the stream only exercises the engine", file=sys.stderr)
    print(f"streamgen serving {args.model} on {up}/{args.replicas} replica(s) "
          f"({'1 GPU' if spec.gpus else f'{spec.cpus:g} CPU'} each, {model.get('max_sessions', '?')} sessions each) "
          f"on http://{args.host}:{srv.port}/ (WebSocket /v1/stream{', token required' if args.token else ''}; "
          f"Ray Serve, ready in {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    srv.stop(drain=True)
    return 0
