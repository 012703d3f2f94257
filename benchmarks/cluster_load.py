"""python benchmarks/cluster_load.py --replicas 1,2 [--max-sessions 8] [--window 8] [--address HOST:PORT]

Load benchmark (not a test) of `streamgen serve --replicas N` (server/cluster.py): for each
replica count, a Ray Serve application on 127.0.0.1 (tiny-world, random weights, pace 1 =
real time, 1 CPU per replica, the server's own ``admission="realtime"`` capacity measure),
then sessions are added one at a time by independent WebSocket clients, each read
continuously. After each addition and ``--settle`` s, every open session's received frame
rate is measured over ``--window`` s; a session is *real-time* when it receives
>= ``--realtime-fraction`` (0.9) of the model's fps. The ramp stops at the first refusal
(``busy``: every replica at its measured capacity), the first count at which not every
session is real-time, or ``--max-total``.

Prints one JSON object; "held" = the most sessions that were all real-time at once.
Without ``--address`` a local Ray instance (``--num-cpus``, loopback) is started and stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time


async def _open(url: str, seed: int, timeout: float):
    from websockets.asyncio.client import connect
    ws = await connect(url, open_timeout=timeout, max_size=1 << 24)
    await ws.send(json.dumps({"type": "start", "prompt": f"benchmark room {seed}", "seed": seed}))
    t_end = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, t_end - time.monotonic()))
        if isinstance(msg, str):
            m = json.loads(msg)
            if m["type"] == "ready":
                return ws, m
            if m["type"] in ("error", "end"):
                await ws.close()
                return None, m


async def _reader(ws, arrivals: list, state: dict):
    """Read everything (so nothing backs up), time-stamping each frame."""
    try:
        async for msg in ws:
            if isinstance(msg, bytes):
                arrivals.append(time.monotonic())
            elif json.loads(msg).get("type") == "end":
                break
    except Exception:
        pass
    state["open"] = False


async def ramp(url: str, fps: float, args) -> dict:
    socks, steps, held, refused = [], [], 0, None
    try:
        for k in range(1, args.max_total + 1):
            ws, m = await _open(url, k, args.timeout)
            if ws is None:
                refused = {"at": k, "code": m.get("code"), "message": m.get("message")}
                break
            arrivals, state = [], {"open": True}
            socks.append((ws, m["session"], arrivals, state, asyncio.ensure_future(_reader(ws, arrivals, state))))
            await asyncio.sleep(args.settle)               # buffered frames drain; batch settles
            t0 = time.monotonic()
            await asyncio.sleep(args.window)
            t1 = time.monotonic()
            rates = [sum(1 for t in a if t0 <= t < t1) / (t1 - t0) for _, _, a, _, _ in socks]
            realtime = sum(r >= args.realtime_fraction * fps for r in rates)
            steps.append({"sessions": k, "realtime_sessions": realtime, "aggregate_fps": round(sum(rates), 1),
                          "min_session_fps": round(min(rates), 1),
                          "sessions_per_replica": {r: sum(1 for _, s, *_ in socks if s.startswith(r + "-"))
                                                   for r in sorted({s.split("-")[0] for _, s, *_ in socks})},
                          "ended": sum(1 for *_, st, _ in socks if not st["open"])})
            if realtime == k:
                held = k
            else:
                break
    finally:
        for *_, task in socks:
            task.cancel()
        await asyncio.gather(*(w.close() for w, *_ in socks), return_exceptions=True)
    return {"held_realtime_sessions": held, "refused": refused, "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-world")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--max-sessions", type=int, default=8, help="cache rows per replica")
    ap.add_argument("--admission", default="realtime", choices=["realtime", "degrade"])
    ap.add_argument("--max-total", type=int, default=16)
    ap.add_argument("--window", type=float, default=8.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--realtime-fraction", type=float, default=0.9)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")      # local Ray on 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from streamgen.config import PipelineConfig
    from streamgen.server.cluster import ClusterServer
    from streamgen.server.cluster_replica import ReplicaSpec
    fps = PipelineConfig.from_name(args.model).fps
    if args.address:
        ray.init(address=args.address, log_to_driver=False, namespace="streamgen-bench")
    else:
        ray.init(address="local", num_cpus=args.num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, namespace="streamgen-bench")
    rows = []
    try:
        for n in [int(x) for x in args.replicas.split(",")]:
            spec = ReplicaSpec(args.model, random_weights=True, cpus=1,
                               app_kwargs=dict(max_sessions=args.max_sessions, pace=1.0, admission=args.admission))
            t0 = time.monotonic()
            with ClusterServer(spec, n, port=0, name=f"bench-{n}") as srv:
                ready_s = time.monotonic() - t0
                caps = [(d.get("load") or {}).get("capacity") for d in srv.describe()]
                res = asyncio.run(ramp(srv.ws_url, fps, args))
            rows.append({"replicas": n, "capacity_by_replica": caps, "startup_s": round(ready_s, 1), **res})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    print(json.dumps({"command": "python benchmarks/cluster_load.py " + " ".join(argv or sys.argv[1:]),
                      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                  "torch": torch.__version__, "ray": ray.__version__},
                      "model": args.model, "random_weights": True, "fps": fps, "pace": 1.0,
                      "admission": args.admission, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
