"""python benchmarks/server_fairness.py [--model default] [--rounds 4] [--window 3] [--rate 20] [--chars 2000]

Fairness benchmark (not a test): a real server on 127.0.0.1 (in this process, pace 1, admission
"degrade" so every session runs) and a bystander session B that only reads. Two experiments, each
alternating `--rounds` quiet and loaded windows of `--window` s (the machine's load drifts, so
loaded windows are compared with their quiet neighbours):
1. client C churns start/stop as fast as the server answers (quiet: C idle; B streams alone);
2. client A streams beside B and, in loaded windows, sends distinct `--chars`-character prompt
   switches at `--rate`/s (quiet: A streams, idle: the same batch in both).
Per window kind: B's frames/s, the largest gap between B's frames (s and chunk periods), p99 gap;
the loaded/quiet fps ratio; what the server did with the messages. Prints one JSON object.
Target (issue 12), experiment 2: ratio >= 0.9, max gap <= 2 chunk periods.

Works against older servers too (options they lack are left out), for before/after figures.
"""
import argparse
import asyncio
import inspect
import json
import os
import platform
import random
import sys
import time

import numpy as np
import torch
from websockets.asyncio.client import connect

from streamgen.engine.pipeline import Pipeline
from streamgen.server.app import create_app
from streamgen.server.cli import ServerThread

WORDS = ("brick stone ice cave hall dusk fog moss lantern river hedge maze desert tomb neon rain snow "
         "copper gate tower forest marble crypt garden harbor canyon temple").split()


def note(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def prompt_of(chars: int, rng: random.Random) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(WORDS) + str(rng.randrange(1000)))
    return " ".join(out)[:chars]


async def next_type(ws, want, timeout=120):
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, str) and json.loads(m)["type"] in want:
            return json.loads(m)


async def run(url: str, args, hub) -> dict:
    rng = random.Random(0)
    batcher = hub.batcher
    async with connect(url, max_size=None) as b:
        await b.send(json.dumps({"type": "start", "prompt": "the bystander: a brick hall", "seed": 1}))
        ready = await next_type(b, ("ready",))
        period = ready["chunk_frames"] / ready["fps"]
        arrivals: list[float] = []

        async def read_b():
            while True:
                m = await b.recv()
                if isinstance(m, bytes):
                    arrivals.append(time.monotonic())

        reader = asyncio.ensure_future(read_b())
        await asyncio.sleep(args.warmup)

        async def interleaved(name, load_on: asyncio.Event):
            """Alternate quiet and loaded windows; the load drifts, so compare neighbours."""
            windows = {"quiet": [], "loaded": []}
            for _ in range(args.rounds):
                for kind in ("quiet", "loaded"):
                    (load_on.set if kind == "loaded" else load_on.clear)()
                    t0 = time.monotonic()
                    await asyncio.sleep(args.window)
                    windows[kind].append((t0, time.monotonic()))
            load_on.clear()
            res = {}
            for kind, ws in windows.items():
                n = sum(sum(1 for t in arrivals if t0 <= t <= t1) for t0, t1 in ws)
                secs = sum(t1 - t0 for t0, t1 in ws)
                gaps = np.concatenate([np.diff([t0] + [t for t in arrivals if t0 <= t <= t1] + [t1]) for t0, t1 in ws])
                res[kind] = {"fps": round(n / secs, 2), "max_gap_s": round(float(gaps.max()), 3),
                             "max_gap_chunks": round(float(gaps.max()) / period, 2),
                             "p99_gap_s": round(float(np.percentile(gaps, 99)), 3)}
            res["fps_ratio"] = round(res["loaded"]["fps"] / (res["quiet"]["fps"] or 1e-9), 3)
            note(name, res)
            return res

        out = {"chunk_period_s": round(period, 4), "realtime_fps": ready["fps"],
               "windows": f"{args.rounds} x ({args.window:g} s quiet + {args.window:g} s loaded)"}

        # 1. client C churns start/stop (as fast as the server answers) next to B alone
        churn_on, churn = asyncio.Event(), {"sent": 0, "started": 0, "t": 0.0}

        async def churner():
            async with connect(url, max_size=None) as c:
                while True:
                    await churn_on.wait()
                    t = time.monotonic()
                    await c.send(json.dumps({"type": "start", "prompt": f"churn {churn['sent']} {prompt_of(60, rng)}"}))
                    churn["sent"] += 1
                    try:
                        r = await next_type(c, ("ready", "error"), timeout=1.0)
                        if r["type"] == "ready":
                            churn["started"] += 1
                            await c.send(json.dumps({"type": "stop"}))
                            await next_type(c, ("end",), timeout=10.0)
                    except asyncio.TimeoutError:       # refused beyond the rate limit: no answer
                        pass
                    churn["t"] += time.monotonic() - t
        task = asyncio.ensure_future(churner())
        out["start_stop_churn"] = await interleaved("start_stop_churn", churn_on)
        task.cancel()
        out["start_stop_churn"].update({"starts_sent_per_s": round(churn["sent"] / max(churn["t"], 1e-9), 1),
                                        "sessions_started_per_s": round(churn["started"] / max(churn["t"], 1e-9), 1)})

        # 2. client A streams beside B (same batch in both windows) and floods prompt switches
        async with connect(url, max_size=None) as a:
            await a.send(json.dumps({"type": "start", "prompt": "the flooder", "seed": 2}))
            await next_type(a, ("ready",))

            async def drain_a():
                while True:
                    await a.recv()
            drainer = asyncio.ensure_future(drain_a())
            await asyncio.sleep(args.warmup)
            flood_on, flood = asyncio.Event(), {"sent": 0, "t": 0.0}
            sw0 = getattr(batcher, "prompt_switches", None)
            co0 = batcher.prep.coalesced if hasattr(batcher, "prep") else None

            async def flooder():
                while True:
                    await flood_on.wait()
                    t0, k = time.monotonic(), 0
                    while flood_on.is_set():
                        await a.send(json.dumps({"type": "prompt", "prompt": prompt_of(args.chars, rng)}))
                        k += 1
                        await asyncio.sleep(max(0.0, t0 + k / args.rate - time.monotonic()))
                    flood["sent"] += k
                    flood["t"] += time.monotonic() - t0
            task = asyncio.ensure_future(flooder())
            out["prompt_flood"] = await interleaved("prompt_flood", flood_on)
            await asyncio.sleep(0.1)
            task.cancel()
            out["prompt_flood"].update({"switches_sent": flood["sent"], "chars": args.chars,
                                        "rate_per_s": round(flood["sent"] / max(flood["t"], 1e-9), 1)})
            if sw0 is not None:
                out["prompt_flood"].update({"switches_applied": batcher.prompt_switches - sw0,
                                            "coalesced": batcher.prep.coalesced - co0})
            drainer.cancel()
        reader.cancel()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--rounds", type=int, default=4, help="quiet/loaded window pairs per experiment")
    ap.add_argument("--window", type=float, default=3.0, help="seconds per window")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=20.0, help="prompt switches per second from client A")
    ap.add_argument("--chars", type=int, default=2000)
    args = ap.parse_args(argv)
    note("loading", args.model)
    pipe = Pipeline.from_pretrained(args.model, random_weights=args.random_weights)
    note("calibrating and starting the server")
    opts = dict(max_sessions=4, pace=1.0, stats_interval=60.0, admission="degrade", rate_limit=200.0)
    accepted = inspect.signature(create_app).parameters
    app = create_app(pipe, **{k: v for k, v in opts.items() if k in accepted})
    hub = app.state.hub
    with ServerThread(app) as srv:
        res = asyncio.run(run(srv.ws_url, args, hub))
        b = hub.batcher
        steps = sorted(b.step_ms)
        res["server"] = {"step_ms_p50": round(steps[len(steps) // 2], 1) if steps else None,
                         "step_ms_p99": round(steps[int(0.99 * (len(steps) - 1))], 1) if steps else None,
                         "capacity": b.capacity() if hasattr(b, "capacity") else None,
                         "step_ms_by_batch": b.step_model.table() if hasattr(b, "step_model") else None}
    print(json.dumps({"command": "python benchmarks/server_fairness.py " + " ".join(sys.argv[1:]),
                      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                  "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
                      "model": args.model, "random_weights": args.random_weights, "results": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
