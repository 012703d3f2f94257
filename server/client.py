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
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from .media import KIND_FRAGMENT, KIND_INIT, KIND_JPEG, unpack_header


def _pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))], 2)


@dataclass
class ActionPlan:
    """Where actions come from: a per-frame ``schedule``, a cycle of ``keys`` changing every
    ``change_every`` frames, or a ``keyboard`` queue (None in it = the user quit)."""

    schedule: list[dict] | None = None
    keys: list[list[str]] | None = None
    change_every: int = 6
    keyboard: "queue.Queue | None" = None

    def at(self, frame: int) -> dict | None:
        """The planned action from video frame ``frame`` on (None: keep the last one)."""
        if self.keyboard is not None:
            return None
        if self.schedule:
            return self.schedule[min(frame, len(self.schedule) - 1)]
        if self.keys:
            return {"keys": self.keys[(frame // self.change_every) % len(self.keys)], "mouse": [0.0, 0.0]}
        return None

    def typed(self) -> list[dict]:
        """Actions typed since the last call; raises EOFError when the user quit."""
        out = []
        while self.keyboard is not None and not self.keyboard.empty():
            a = self.keyboard.get_nowait()
            if a is None:
                raise EOFError
            out.append(a)
        return out


class ActionLog:
    """Numbers each changed action with a new ``seq`` and measures action -> frame latency:
    the time from sending seq to the first frame whose header carries seq or a later one."""

    def __init__(self, ws):
        self.ws, self.seq, self.last = ws, 0, None
        self.sent_at: dict[int, float] = {}
        self.latency_ms: list[float] = []

    async def send(self, action: dict | None) -> None:
        if action is None or action == self.last:
            return
        self.seq += 1
        self.last = action
        self.sent_at[self.seq] = time.monotonic()
        await self.ws.send(json.dumps({"type": "action", "seq": self.seq, **action}))

    def frame_arrived(self, action_seq: int | None, now: float) -> None:
        if action_seq is None:
            return
        for s in [s for s in self.sent_at if s <= action_seq]:
            self.latency_ms.append((now - self.sent_at.pop(s)) * 1000)

    def summary(self) -> dict:
        lat = self.latency_ms
        return {"n": len(lat), "p50": _pct(lat, 0.5), "p90": _pct(lat, 0.9), "p99": _pct(lat, 0.99)}


class FrameSink:
    """What happens to received media: JPEG frames decoded (for ``out`` and/or ``keep``),
    fMP4 bytes collected, written to ``out`` and decoded at the end if ``keep``."""

    def __init__(self, codec: str, out: str | None = None, keep: bool = False):
        self.codec, self.out, self.keep = codec, out, keep
        self.fmp4 = bytearray()
        self.frames: list[np.ndarray] = []     # each uint8 [H, W, 3]
        self.writer = None

    def open(self, ready: dict) -> None:
        if self.out and self.codec == "jpeg":
            from streamgen.io.video import Mp4Writer
            self.writer = Mp4Writer(self.out, ready["fps"], ready["width"], ready["height"])

    def add(self, kind: int, payload: bytes) -> None:
        if kind != KIND_JPEG:                  # fMP4 init segment or fragment
            self.fmp4 += payload
            return
        if self.writer is None and not self.keep:
            return
        from PIL import Image
        arr = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
        if self.writer is not None:
            self.writer.write(arr[None])
        if self.keep:
            self.frames.append(arr)

    def close(self) -> list[np.ndarray]:
        if self.writer is not None:
            self.writer.close()
        if self.out and self.codec == "fmp4":
            with open(self.out, "wb") as f:
                f.write(self.fmp4)
        if self.keep and self.codec == "fmp4" and self.fmp4:
            import av
            with av.open(io.BytesIO(bytes(self.fmp4))) as c:
                self.frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return self.frames


async def _open_stream(ws, prompt: str, seed: int | None, codec: str, timeout: float, res: dict) -> dict | None:
    """Send ``start`` and wait for ``ready`` (None, with the error in res, if refused)."""
    start = {"type": "start", "prompt": prompt, "codec": codec}
    if seed is not None:
        start["seed"] = seed
    await ws.send(json.dumps(start))
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if m["type"] == "ready":
            return m
        if m["type"] == "error":
            res["errors"].append(m)
            return None


def _on_text(msg: str, res: dict) -> bool:
    """Record a JSON control message; True when it ends the stream."""
    m = json.loads(msg)
    if m["type"] == "stats":
        res["stats"] = m
    elif m["type"] == "error":
        res["errors"].append(m)
    elif m["type"] == "end":
        res["end"] = m
        return True
    return False


async def _stop(ws, sink: FrameSink, res: dict) -> None:
    """Send ``stop`` and drain until ``end`` (fMP4 bytes still arriving go to the sink)."""
    await ws.send(json.dumps({"type": "stop"}))
    try:
        while res["end"] is None:
            msg = await asyncio.wait_for(ws.recv(), 5)
            if isinstance(msg, str):
                _on_text(msg, res)
            elif sink.codec == "fmp4":
                sink.add(KIND_FRAGMENT, unpack_header(msg)[1])
    except Exception:
        pass


async def run_client(url: str, prompt: str, *, frames: int = 48, seed: int | None = 0, codec: str = "jpeg",
                     token: str | None = None, actions: ActionPlan | None = None, out: str | None = None,
                     keep_frames: bool = False, switch_prompt: tuple[int, str] | None = None,
                     timeout: float = 60.0) -> dict:
    """Stream ``frames`` frames driven by ``actions``; returns a summary dict (with the decoded
    frames as ``frames_data`` if keep_frames). Protocol only: actions, latency and media live in
    :class:`ActionPlan`, :class:`ActionLog` and :class:`FrameSink`."""
    from websockets.asyncio.client import connect
    plan = actions or ActionPlan()
    sink = FrameSink(codec, out, keep_frames)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    res = {"url": url, "codec": codec, "frames": 0, "errors": [], "stats": None, "end": None}
    received, t_first, t0 = 0, None, time.monotonic()
    async with connect(url, additional_headers=headers, max_size=64 << 20, open_timeout=timeout) as ws:
        log = ActionLog(ws)
        res["ready"] = ready = await _open_stream(ws, prompt, seed, codec, timeout, res)
        if ready is None:
            return res
        sink.open(ready)
        await log.send(plan.at(0))
        try:
            while received < frames:
                for a in plan.typed():
                    await log.send(a)
                msg = await asyncio.wait_for(ws.recv(), timeout)
                if isinstance(msg, str):
                    if _on_text(msg, res):
                        break
                    continue
                hdr, payload = unpack_header(msg)
                now = time.monotonic()
                if hdr.kind == KIND_INIT:
                    sink.add(hdr.kind, payload)
                    continue
                if hdr.kind not in (KIND_JPEG, KIND_FRAGMENT):
                    continue
                t_first = t_first or now
                log.frame_arrived(hdr.action_seq, now)
                sink.add(hdr.kind, payload)
                received += 1
                if switch_prompt and received == switch_prompt[0]:
                    await ws.send(json.dumps({"type": "prompt", "prompt": switch_prompt[1]}))
                await log.send(plan.at(hdr.frame + 1))
        except EOFError:
            pass
        t_end = time.monotonic()
        await _stop(ws, sink, res)
    got = sink.close()
    res.update({
        "frames": received, "actions_sent": log.seq,
        "fps": round((received - 1) / (t_end - t_first), 2) if t_first and received > 1 and t_end > t_first else None,
        "first_frame_s": round(t_first - t0, 3) if t_first else None,
        "action_latency_ms": log.summary(),
        "out": out,
    })
    if keep_frames:
        res["frames_data"] = got
    return res


def _parse_keys(spec: str) -> list[list[str]]:
    return [[k for k in part.split("+") if k] for part in spec.split(",")]


def _keyboard_queue(space_keys):
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
                                     token=args.token, out=args.out, switch_prompt=switch, timeout=args.timeout,
                                     actions=ActionPlan(schedule, keys, args.change_every, kb)))
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
