"""streamgen client --url ws://127.0.0.1:8000/v1/stream --prompt "a dungeon" --keys W,D --frames 96 --out out.mp4

Connect to a streamgen server, drive the stream with actions and write what arrives to MP4;
prints measured fps and action->frame latency (JSON). Also: ``python -m streamgen.server.client``.

Action sources (one of):
  --actions FILE.jsonl  line i = the action from video frame i on (as `streamgen generate`)
  --keys W,A,S,D        cycle through these keys (comma list; "+" joins keys: W+A), changing
                        every --change-every frames
  --keyboard            type keys + Enter on stdin ("w d", "wa", empty line = no keys, "q" quits)
Every change is sent as an action with a new "seq"; the latency of seq is the time from
sending it to the first frame whose header carries that seq (or a later one).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import threading
import time

import numpy as np

from .media import KIND_FRAGMENT, KIND_INIT, KIND_JPEG, unpack_header


def _pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))], 2)


async def run_client(url: str, prompt: str, *, frames: int = 48, seed: int | None = 0, codec: str = "jpeg",
                     token: str | None = None, schedule=None, keys: list[list[str]] | None = None,
                     change_every: int = 6, keyboard: "queue_like | None" = None, out: str | None = None,
                     switch_prompt: tuple[int, str] | None = None, timeout: float = 60.0,
                     keep_frames: bool = False) -> dict:
    """Stream ``frames`` frames; returns a summary dict (and the decoded frames if keep_frames)."""
    from websockets.asyncio.client import connect
    headers = {"Authorization": f"Bearer {token}"} if token else None
    res = {"url": url, "codec": codec, "frames": 0, "errors": [], "stats": None, "end": None}
    sent_at: dict[int, float] = {}
    lat: list[float] = []
    got: list[np.ndarray] = []
    fmp4 = bytearray()
    seq = 0
    last_action = None
    t_first = t0 = None
    writer = None
    async with connect(url, additional_headers=headers, max_size=64 << 20, open_timeout=timeout) as ws:
        start = {"type": "start", "prompt": prompt, "codec": codec}
        if seed is not None:
            start["seed"] = seed
        t0 = time.monotonic()
        await ws.send(json.dumps(start))
        ready = None
        while ready is None:
            m = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if m["type"] == "ready":
                ready = m
            elif m["type"] == "error":
                res["errors"].append(m)
                res["ready"] = None
                return res
        res["ready"] = ready
        if out and codec == "jpeg":
            from streamgen.io.video import Mp4Writer
            writer = Mp4Writer(out, ready["fps"], ready["width"], ready["height"])

        async def send_action(action):
            nonlocal seq, last_action
            if action == last_action:
                return
            seq += 1
            last_action = action
            sent_at[seq] = time.monotonic()
            await ws.send(json.dumps({"type": "action", "seq": seq, **action}))

        def planned(i):
            if schedule:
                return schedule[min(i, len(schedule) - 1)]
            if keys:
                return {"keys": keys[(i // change_every) % len(keys)], "mouse": [0.0, 0.0]}
            return None

        first = planned(0)
        if first is not None:
            await send_action(first)
        received = 0
        try:
            while received < frames:
                if keyboard is not None:
                    while not keyboard.empty():
                        a = keyboard.get_nowait()
                        if a is None:
                            raise EOFError
                        await send_action(a)
                msg = await asyncio.wait_for(ws.recv(), timeout)
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m["type"] == "stats":
                        res["stats"] = m
                    elif m["type"] == "error":
                        res["errors"].append(m)
                    elif m["type"] == "end":
                        res["end"] = m
                        break
                    continue
                hdr, payload = unpack_header(msg)
                now = time.monotonic()
                if hdr.kind == KIND_INIT:
                    fmp4 += payload
                    continue
                if hdr.kind not in (KIND_JPEG, KIND_FRAGMENT):
                    continue
                if t_first is None:
                    t_first = now
                if hdr.action_seq is not None:
                    for s in [s for s in sent_at if s <= hdr.action_seq]:
                        lat.append((now - sent_at.pop(s)) * 1000)
                if hdr.kind == KIND_JPEG:
                    if writer is not None or keep_frames:
                        from PIL import Image
                        arr = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
                        if writer is not None:
                            writer.write(arr[None])
                        if keep_frames:
                            got.append(arr)
                else:
                    fmp4 += payload
                received += 1
                if switch_prompt and received == switch_prompt[0]:
                    await ws.send(json.dumps({"type": "prompt", "prompt": switch_prompt[1]}))
                nxt = planned(hdr.frame + 1) if keyboard is None else None
                if nxt is not None:
                    await send_action(nxt)
        except EOFError:
            pass
        t_end = time.monotonic()
        await ws.send(json.dumps({"type": "stop"}))
        try:
            while res["end"] is None:
                msg = await asyncio.wait_for(ws.recv(), 5)
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m["type"] == "end":
                        res["end"] = m
                elif codec == "fmp4":
                    fmp4 += unpack_header(msg)[1]
        except Exception:
            pass
    if writer is not None:
        writer.close()
    if out and codec == "fmp4":
        with open(out, "wb") as f:
            f.write(fmp4)
    if keep_frames and codec == "fmp4" and fmp4:
        import av
        with av.open(io.BytesIO(bytes(fmp4))) as c:
            got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    res.update({
        "frames": received, "actions_sent": seq,
        "fps": round((received - 1) / (t_end - t_first), 2) if t_first and received > 1 and t_end > t_first else None,
        "first_frame_s": round(t_first - t0, 3) if t_first else None,
        "action_latency_ms": {"n": len(lat), "p50": _pct(lat, 0.5), "p90": _pct(lat, 0.9), "p99": _pct(lat, 0.99)},
        "out": out,
    })
    if keep_frames:
        res["frames_data"] = got
    return res


def _parse_keys(spec: str) -> list[list[str]]:
    return [[k for k in part.split("+") if k] for part in spec.split(",")]


def _keyboard_queue(space_keys):
    import queue
    q: queue.Queue = queue.Queue()
    upper = {k.upper(): k for k in space_keys}

    def reader():
        for line in sys.stdin:
            line = line.strip()
            if line.lower() in ("q", "quit", "exit"):
                break
            ks = [upper[c.upper()] for c in line.replace(" ", "") if c.upper() in upper]
            q.put({"keys": list(dict.fromkeys(ks)), "mouse": [0.0, 0.0]})
        q.put(None)

    threading.Thread(target=reader, daemon=True).start()
    return q


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="streamgen client", description="Stream from a streamgen server into an MP4.")
    ap.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    ap.add_argument("--prompt", default="a stone dungeon corridor lit by torches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codec", default="jpeg", choices=["jpeg", "fmp4"])
    ap.add_argument("--token", default=None, help="bearer token (sent as Authorization header)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--actions", default=None, help="JSONL file: line i = action from video frame i on")
    src.add_argument("--keys", default=None, help="cycle through keys, e.g. W,A,S,D or W+A,D")
    src.add_argument("--keyboard", action="store_true", help="read keys from stdin lines")
    ap.add_argument("--change-every", type=int, default=6, help="frames between key changes (--keys)")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--switch-prompt", default=None, metavar="FRAME:TEXT")
    ap.add_argument("--out", default=None, help="write the stream to this MP4")
    ap.add_argument("--timeout", type=float, default=60.0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frames <= 0:
        print("error: --frames must be > 0", file=sys.stderr)
        return 2
    schedule = keys = kb = None
    if args.actions:
        from streamgen.io.actions import validate_action
        from streamgen.config import ActionSpace
        loose = ActionSpace(keys=tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), mouse=True, mouse_range=1e9)
        schedule = []
        with open(args.actions, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        schedule.append(validate_action(loose, json.loads(line)))
                    except Exception as e:
                        print(f"error: {args.actions}:{n}: {e}", file=sys.stderr)
                        return 2
    elif args.keys:
        keys = _parse_keys(args.keys)
    elif args.keyboard:
        kb = _keyboard_queue(["W", "A", "S", "D"])
        print("keyboard: type keys (e.g. 'wd') + Enter; empty line = no keys; q = quit", file=sys.stderr)
    switch = None
    if args.switch_prompt:
        at, _, text = args.switch_prompt.partition(":")
        if not at.isdigit() or not text.strip():
            print("error: --switch-prompt takes FRAME:TEXT", file=sys.stderr)
            return 2
        switch = (int(at), text)
    try:
        res = asyncio.run(run_client(args.url, args.prompt, frames=args.frames, seed=args.seed, codec=args.codec,
                                     token=args.token, schedule=schedule, keys=keys, change_every=args.change_every,
                                     keyboard=kb, out=args.out, switch_prompt=switch, timeout=args.timeout))
    except (OSError, asyncio.TimeoutError) as e:
        print(f"error: cannot stream from {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:   # websockets' InvalidStatus / ConnectionClosed
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if res.get("ready") is None:
        err = res["errors"][0] if res["errors"] else {"code": "?", "message": "no ready"}
        print(f"error: server refused the stream: {err['code']}: {err['message']}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in res.items() if k != "ready"}, indent=2))
    if res["errors"]:
        print(f"server reported {len(res['errors'])} error(s): {res['errors'][0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
