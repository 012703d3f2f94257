"""streamgen serve [--model default] [--host 127.0.0.1] [--port 8000] [--token T] [--max-sessions 8]

Run the streaming WebSocket server (protocol: PROTOCOL.md). Binding to anything other than
loopback requires --token (or STREAMGEN_TOKEN). SIGINT/SIGTERM drain the sessions: every
client gets its queued frames and an `end` message before the socket closes.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading

from streamgen.errors import ConfigError

WS_MAX_SIZE = 1 << 20   # transport cap; the protocol limit (--max-message-bytes) answers with an error first


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="streamgen serve", description="Streaming video generation server.")
    ap.add_argument("--model", default="default", help="shipped model, preset (with --random-weights) or checkpoint")
    ap.add_argument("--random-weights", action="store_true", help="random init (presets; untrained output)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token", default=os.environ.get("STREAMGEN_TOKEN"),
                    help="bearer token (required off loopback; default: $STREAMGEN_TOKEN)")
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--pace", type=float, default=1.0,
                    help="generation speed relative to real time (1 = model fps; 0 = as fast as possible)")
    ap.add_argument("--max-message-bytes", type=int, default=65536)
    ap.add_argument("--rate-limit", type=float, default=200.0, help="client messages per second per connection")
    ap.add_argument("--max-queue-frames", type=int, default=None, help="per-session send queue (default 2 chunks)")
    ap.add_argument("--max-stream-frames", type=int, default=None, help="end sessions after this many frames")
    ap.add_argument("--stats-interval", type=float, default=1.0)
    ap.add_argument("--log-level", default="info")
    return ap


def make_server(app, host: str, port: int, log_level: str = "info", sock: socket.socket | None = None):
    """A uvicorn server whose shutdown first drains the app's sessions."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await app.state.hub.drain()
            await super().shutdown(sockets=sockets)

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, ws_max_size=WS_MAX_SIZE,
                         ws_per_message_deflate=False, lifespan="on", timeout_graceful_shutdown=5)
    return DrainingServer(cfg)


class ServerThread:
    """Run an app on 127.0.0.1 in a background thread (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.ws_url = f"ws://{host}:{self.port}/v1/stream"
        self.server = make_server(app, host, self.port, log_level="warning")
        self.thread = threading.Thread(target=lambda: self.server.run(sockets=[self.sock]), daemon=True)

    def __enter__(self):
        import time
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host) and not args.token:
        print(f"error: refusing to bind {args.host} (not loopback) without a token; pass --token or set "
              "STREAMGEN_TOKEN (clients send 'Authorization: Bearer <token>' or ?token=)", file=sys.stderr)
        return 2
    if args.max_sessions < 1:
        raise ConfigError("--max-sessions must be >= 1")
    if args.pace < 0:
        raise ConfigError("--pace must be >= 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .app import create_app
    app = create_app(args.model, random_weights=args.random_weights, device=args.device, dtype=args.dtype,
                     max_sessions=args.max_sessions, token=args.token, pace=args.pace,
                     max_message_bytes=args.max_message_bytes, rate_limit=args.rate_limit,
                     max_queue_frames=args.max_queue_frames, max_stream_frames=args.max_stream_frames,
                     stats_interval=args.stats_interval)
    pipe = app.state.hub.pipe
    if not pipe.trained:
        print("!! RANDOM WEIGHTS: the model is not trained; the stream only exercises the engine", file=sys.stderr)
    d = pipe.describe()
    print(f"streamgen serving {d['source']} ({d['width']}x{d['height']} @ {d['fps']} fps, "
          f"{args.max_sessions} sessions) on http://{args.host}:{args.port}/  "
          f"(WebSocket /v1/stream{', token required' if args.token else ''})", file=sys.stderr, flush=True)
    make_server(app, args.host, args.port, args.log_level).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
