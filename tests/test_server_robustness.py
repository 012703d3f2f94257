"""Bad input, auth, disconnects, backpressure, memory and shutdown against a real server on 127.0.0.1."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from streamgen.server.app import create_app  # noqa: E402
from streamgen.server.cli import ServerThread, main as serve_main  # noqa: E402
from streamgen.server.media import unpack_header  # noqa: E402
from server_helpers import next_json, running_server, tiny_world_pipe  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_world_pipe()


@pytest.fixture(scope="module")
def server(pipe):
    with running_server(pipe, max_sessions=4, pace=4.0, rate_limit=50, stats_interval=0.3, admission="degrade") as srv:
        yield srv


async def next_frame(ws, timeout=10):
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, bytes):
            return unpack_header(msg)[0]


def test_bad_input_gets_clear_errors_and_the_session_survives(server):
    async def go():
        async with connect(server.ws_url) as ws, connect(server.ws_url) as other:
            await other.send(json.dumps({"type": "start", "prompt": "the bystander"}))
            assert (await next_json(other))["type"] == "ready"
            await ws.send(json.dumps({"type": "action", "keys": ["W"]}))
            assert (await next_json(ws))["code"] == "not_started"
            await ws.send(json.dumps({"type": "start", "prompt": "x" * 5000}))
            e = await next_json(ws)
            assert e["code"] == "bad_prompt" and "limit" in e["message"]
            await ws.send(json.dumps({"type": "start", "prompt": "a cave", "codec": "gif"}))
            assert (await next_json(ws))["code"] == "bad_codec"
            await ws.send(json.dumps({"type": "start", "prompt": "a cave"}))
            assert (await next_json(ws))["type"] == "ready"
            cases = [
                ("{not json", "bad_json"),
                ("[1, 2]", "bad_json"),
                (json.dumps({"type": "jump"}), "unknown_type"),
                (json.dumps({"type": "action", "keys": ["Q"]}), "bad_action"),
                (json.dumps({"type": "action", "keys": "W"}), "bad_action"),
                (json.dumps({"type": "action", "mouse": [5, 0]}), "bad_action"),
                (json.dumps({"type": "action", "mouse": [float("nan"), 0]}), "bad_action"),
                (json.dumps({"type": "action", "keys": ["W"], "seq": -1}), "bad_action"),
                (json.dumps({"type": "prompt", "prompt": ""}), "bad_prompt"),
                (json.dumps({"type": "start", "prompt": "again"}), "already_started"),
                (json.dumps({"type": "action", "keys": ["W"], "pad": "x" * 100_000}), "too_large"),
                (b"\x00\xffgarbage\x13\x37", "bad_message"),
            ]
            for payload, code in cases:
                await ws.send(payload)
                e = await next_json(ws)
                assert e["type"] == "error" and e["code"] == code, (payload[:40], e)
                assert e["message"]
            # still streaming, and actions still work
            await ws.send(json.dumps({"type": "action", "keys": ["S"], "seq": 7}))
            for _ in range(30):
                h = await next_frame(ws)
                if h.action_seq == 7:
                    break
            assert h.action_seq == 7
            # a message over the transport cap closes only that connection (1009), others go on
            async with connect(server.ws_url, max_size=None) as huge:
                try:   # the server may close (1009) before the client has finished sending
                    await huge.send("x" * (2 << 20))
                except ConnectionClosed:
                    pass
                with pytest.raises(Exception):
                    await asyncio.wait_for(huge.recv(), 5)
                assert huge.close_code == 1009
            f1 = (await next_frame(other)).frame
            f2 = (await next_frame(other)).frame
            assert f2 == f1 + 1
            # rate limit: one error per second, extra messages dropped, session alive
            for _ in range(200):
                await ws.send(json.dumps({"type": "action", "keys": ["W"]}))
            e = await next_json(ws)
            assert e["code"] == "rate_limited"
            await next_frame(ws)
    asyncio.run(go())
    assert "streamgen_errors_total{code=\"bad_json\"}" in httpx.get(server.url + "/metrics").text


def test_auth(pipe):
    app = create_app(pipe, max_sessions=2, token="s3cret", pace=4.0)
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/healthz").status_code == 200
        r = httpx.get(srv.url + "/metrics")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models?token=s3cret").status_code == 200
        assert httpx.get(srv.url + "/v1/models?token=wrong").status_code == 401

        async def go():
            async with connect(srv.ws_url) as ws:
                e = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert e["code"] == "unauthorized" and "token" in e["message"]
                with pytest.raises(Exception):
                    await asyncio.wait_for(ws.recv(), 5)
                assert ws.close_code == 1008
            for kw, url in [({"additional_headers": {"Authorization": "Bearer s3cret"}}, srv.ws_url),
                            ({}, srv.ws_url + "?token=s3cret")]:
                async with connect(url, **kw) as ws:
                    await ws.send(json.dumps({"type": "start", "prompt": "allowed"}))
                    assert (await next_json(ws))["type"] == "ready"
                    await next_frame(ws)
        asyncio.run(go())


def test_cli_refuses_public_bind_without_token(capsys):
    assert serve_main(["--host", "0.0.0.0", "--model", "tiny-world", "--random-weights"]) == 2
    assert "without a token" in capsys.readouterr().err


CLIENT = """
import asyncio, json, sys
from websockets.asyncio.client import connect
async def main():
    async with connect(sys.argv[1]) as ws:
        await ws.send(json.dumps({"type": "start", "prompt": "doomed"}))
        n = 0
        async for m in ws:
            if isinstance(m, bytes):
                n += 1
                if n == 3:
                    print("streaming", flush=True)
asyncio.run(main())
"""


def test_killed_client_frees_its_session_within_1s(server):
    b = server.hub.batcher
    p = subprocess.Popen([sys.executable, "-c", CLIENT, server.ws_url], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "streaming"
        assert b.active == 1
        t0 = time.monotonic()
        p.kill()
        while b.active and time.monotonic() - t0 < 3:
            time.sleep(0.005)
        freed = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    assert b.active == 0 and b.reserved == 0
    assert freed < 1.0, f"session freed after {freed:.2f}s"


def _rss_mb():
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for RSS")
def test_slow_client_drops_frames_and_memory_stays_flat(pipe):
    """A client that stops reading never grows server memory: the per-session queue is bounded
    (drop-oldest) and drops are counted; sessions churning for a while leave RSS flat."""
    app = create_app(pipe, max_sessions=4, pace=0, max_queue_frames=6, stats_interval=0.2, admission="degrade")
    hub = app.state.hub
    with ServerThread(app) as srv:
        async def churn(seconds):
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                async with connect(srv.ws_url) as ws:
                    await ws.send(json.dumps({"type": "start", "prompt": "churn"}))
                    for _ in range(20):
                        await next_frame(ws)

        async def go():
            # a stalled reader: tiny receive buffer, never reads
            import socket
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", srv.port))
            stalled = await connect(srv.ws_url, sock=sock, max_size=None, max_queue=1)
            await stalled.send(json.dumps({"type": "start", "prompt": "slow reader"}))
            # loopback kernel buffers absorb megabytes, so also make this connection's socket slow:
            # every send takes 300 ms (what a congested link does to the sender; slower than a loaded
            # CPU generates, so frames must be dropped)
            while not any(c.slot is not None for c in hub.connections):
                await asyncio.sleep(0.01)
            conn = [c for c in hub.connections if c.slot is not None][0]
            orig = conn.send_bytes

            async def slow_send(data):
                await asyncio.sleep(0.3)
                await orig(data)
            conn.send_bytes = slow_send
            await asyncio.gather(*(churn(1.5) for _ in range(3)))
            rss0 = _rss_mb()
            await asyncio.gather(*(churn(4.0) for _ in range(3)))
            rss1 = _rss_mb()
            depth, dropped = len(conn.queue), conn.dropped
            await stalled.close()
            return rss0, rss1, depth, dropped

        rss0, rss1, depth, dropped = asyncio.run(go())
    assert depth <= 6
    assert dropped > 0 and hub.counters["frames_dropped"] >= dropped
    assert rss1 - rss0 < 40, f"RSS grew {rss1 - rss0:.1f} MB during the soak"


def test_graceful_shutdown_drains_sessions(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([sys.executable, "-m", "streamgen.server.cli", "--model", "tiny-world", "--random-weights",
                          "--port", str(port), "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.monotonic() - t0 < 60, "server did not come up"
            time.sleep(0.1)

        async def go():
            async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
                await ws.send(json.dumps({"type": "start", "prompt": "until the end"}))
                assert (await next_json(ws))["type"] == "ready"
                await next_frame(ws)
                p.send_signal(signal.SIGTERM)
                end = await next_json(ws, timeout=10)
                with pytest.raises(Exception):
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
                return end, ws.close_code
        end, code = asyncio.run(go())
        assert end["type"] == "end" and end["reason"] == "shutdown" and end["frames"] >= 1
        assert code == 1001
        assert p.wait(15) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal after draining
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
