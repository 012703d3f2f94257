"""python benchmarks/server_load.py --sessions 1,2,4,8 --frames 48 [--pace 0] [--model tiny-world]

Load benchmark (not a test): a real server on 127.0.0.1 (random weights), N concurrent real
WebSocket clients each changing keys every 6 frames; prints one JSON object: per N, aggregate
fps and p50/p99 action->frame latency.
"""
import argparse
import asyncio
import json
import os
import platform
import sys
import time

import torch

from streamgen.engine.pipeline import Pipeline
from streamgen.server.app import create_app
from streamgen.server.cli import ServerThread
from streamgen.server.client import ActionPlan, _pct, run_client


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-world")
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--pace", type=float, default=1.0)
    args = ap.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model, random_weights=True)
    counts = [int(x) for x in args.sessions.split(",")]
    app = create_app(pipe, max_sessions=max(counts), pace=args.pace)
    rows = []
    with ServerThread(app) as srv:
        for n in counts:
            async def go():
                return await asyncio.gather(*(run_client(srv.ws_url, f"benchmark room {i}", frames=args.frames, seed=i,
                                                         actions=ActionPlan(keys=[["W"], ["A"], ["S"], ["D"]],
                                                                            change_every=6)) for i in range(n)))
            b = app.state.hub.batcher
            f0, s0 = b.forward_calls, b.steps
            t0 = time.monotonic()
            res = asyncio.run(go())
            wall = time.monotonic() - t0
            p50 = [r["action_latency_ms"]["p50"] for r in res if r["action_latency_ms"]["p50"] is not None]
            p99 = [r["action_latency_ms"]["p99"] for r in res if r["action_latency_ms"]["p99"] is not None]
            rows.append({"sessions": n, "frames": sum(r["frames"] for r in res),
                         "aggregate_fps": round(sum(r["frames"] for r in res) / wall, 1),
                         "per_session_fps_p50": _pct([r["fps"] for r in res if r["fps"]], 0.5),
                         "action_latency_ms_p50": _pct(p50, 0.5), "action_latency_ms_p99": max(p99) if p99 else None,
                         "steps": b.steps - s0, "forwards": b.forward_calls - f0,
                         "dropped": sum((r["end"] or {}).get("dropped_frames", 0) for r in res),
                         "errors": sum(len(r["errors"]) for r in res)})
    print(json.dumps({"command": "python benchmarks/server_load.py " + " ".join(sys.argv[1:]),
                      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
                      "model": args.model, "random_weights": True, "pace": args.pace,
                      "note": "p99 column = worst per-session p99", "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
