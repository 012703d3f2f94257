"""streamgen serve [--model default] [--host 127.0.0.1] [--port 8000] [--token T] [--max-sessions 8]
                [--admission realtime|degrade] [--slow-reader-s 5]

Run the streaming WebSocket server (protocol: PROTOCOL.md). Binding to anything other than
loopback requires --token (or STREAMGEN_TOKEN). SIGINT/SIGTERM drain the sessions: every
client gets its queued frames and an `end` message before the socket closes. At start-up the
server times its batched step per batch size; by default it admits only as many sessions as
it serves in real time (``--admission degrade``: up to --max-sessions, slower than real time).
Tokens never reach the log (``?token=`` is masked in uvicorn's access lines).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading

from streamgen.cli_args import add_model_args, load_pipeline
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
    add_model_args(ap)        # --model --random-weights --device --dtype --attn-backend ... (shared with generate/demo)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token", default=os.environ.get("STREAMGEN_TOKEN"),
                    help="bearer token (required off loopback; default: $STREAMGEN_TOKEN)")
    ap.add_argument("--max-sessions", type=int, default=8,
                    help="upper bound on concurrent sessions (cache rows); the measured real-time capacity "
                         "may admit fewer (--admission)")
    ap.add_argument("--admission", default="realtime", choices=["realtime", "degrade"],
                    help="realtime: refuse (busy) a session that would push the batch below real time "
                         "(measured); degrade: admit up to --max-sessions and report the real-time factor")
    ap.add_argument("--slow-reader-s", type=float, default=5.0,
                    help="end a session whose send queue stays full this long (client not reading)")
    ap.add_argument("--health-stall-s", type=float, default=None,
                    help="/healthz turns 503 when no step completes this long with sessions active "
                         "(default: 6 chunk periods, at least 2 s)")
    ap.add_argument("--pace", type=float, default=1.0,
                    help="generation speed relative to real time (1 = model fps; 0 = as fast as possible)")
    ap.add_argument("--max-message-bytes", type=int, default=65536)
    ap.add_argument("--rate-limit", type=float, default=200.0, help="client messages per second per connection")
    ap.add_argument("--start-rate", type=float, default=4.0, help="session starts per second per connection")
    ap.add_argument("--max-queue-frames", type=int, default=None, help="per-session send queue (default 2 chunks)")
    ap.add_argument("--max-stream-frames", type=int, default=None, help="end sessions after this many frames")
    ap.add_argument("--stats-interval", type=float, default=1.0)
    ap.add_argument("--replicas", type=int, default=None,
                    help="serve on Ray Serve with N model replicas (one GPU each with --device cuda); "
                         "needs the 'cluster' extra; see docs/scaling.md")
    ap.add_argument("--address", default=None,
                    help="with --replicas: the Ray cluster ('auto', ray://HOST:10001; default: a local Ray)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --replicas: Ray CPUs per replica")
    ap.add_argument("--log-level", default="info")
    return ap


def make_server(app, host: str, port: int, log_level: str = "info", sock: socket.socket | None = None):
    """A uvicorn server whose shutdown first drains the app's sessions; tokens are masked in its logs."""
    import uvicorn

    from .app import install_log_redaction

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await app.state.hub.drain()
            await super().shutdown(sockets=sockets)

    # keepalive pings at the slow-reader interval: a client that stops reading its socket stops
    # answering them, and is closed (1011) within two intervals, whatever the kernel buffers hold
    ping = float(getattr(getattr(getattr(app, "state", None), "hub", None), "slow_reader_s", 20.0))
    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, ws_max_size=WS_MAX_SIZE,
                         ws_per_message_deflate=False, lifespan="on", timeout_graceful_shutdown=5,
                         ws_ping_interval=ping, ws_ping_timeout=ping)
    install_log_redaction()                  # after uvicorn.Config has configured its loggers
    return DrainingServer(cfg)


class ServerThread:
    """Run an app on 127.0.0.1 in a background thread (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.ws_url = f"ws://{host}:{self.port}/v1/stream"
        self.server = make_server(app, host, self.port, log_level=log_level)
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
    if args.slow_reader_s <= 0:
        raise ConfigError("--slow-reader-s must be > 0")
    if args.start_rate <= 0 or args.rate_limit <= 0:
        raise ConfigError("--start-rate and --rate-limit must be > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.replicas is not None:
        from .cluster import main_cluster
        return main_cluster(args)
    from .app import create_app
    app = create_app(load_pipeline(args)[0], random_weights=args.random_weights, device=args.device, dtype=args.dtype,
                     max_sessions=args.max_sessions, token=args.token, pace=args.pace,
                     max_message_bytes=args.max_message_bytes, rate_limit=args.rate_limit,
                     max_queue_frames=args.max_queue_frames, max_stream_frames=args.max_stream_frames,
                     stats_interval=args.stats_interval, admission=args.admission,
                     slow_reader_s=args.slow_reader_s, health_stall_s=args.health_stall_s,
                     start_rate=args.start_rate)
    pipe = app.state.hub.pipe
    if not pipe.trained:
        print("!! RANDOM WEIGHTS: the model is not trained; the stream only exercises the engine", file=sys.stderr)
    d = pipe.describe()
    print(f"streamgen serving {d['source']} ({d['width']}x{d['height']} @ {d['fps']} fps, "
          f"up to {args.max_sessions} sessions, admission {args.admission}) on http://{args.host}:{args.port}/  "
          f"(WebSocket /v1/stream{', token required' if args.token else ''})", file=sys.stderr, flush=True)
    make_server(app, args.host, args.port, args.log_level).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
