"""The stream protocol end to end: a real uvicorn server on 127.0.0.1, real WebSocket clients.

Uses tiny-world with random weights (CPU) at pace=4 (4x real time) to keep the run short.
"""
import asyncio
import json
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("websockets")
from websockets.asyncio.client import connect  # noqa: E402

from streamgen.server.batcher import Batcher  # noqa: E402
from streamgen.server.client import ActionPlan, run_client  # noqa: E402
from streamgen.server.media import KIND_FRAGMENT, KIND_INIT, KIND_JPEG, unpack_header  # noqa: E402
from server_helpers import tiny_world_pipe, running_server, recv_json  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_world_pipe()


@pytest.fixture(scope="module")
def server(pipe):
    with running_server(pipe, max_sessions=8, pace=4.0, stats_interval=0.3, admission="degrade") as srv:
        yield srv


def test_http_endpoints(server):
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    m = httpx.get(server.url + "/v1/models").json()
    assert m["loaded"]["action_space"]["keys"] == ["W", "A", "S", "D"]
    assert m["presets"]["tiny-world"]["fps"] == 16 and "wan2.1-t2v-1.3b" in m["presets"]
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE streamgen_model_forwards_total counter" in text
    assert "streamgen_sessions_max 8" in text
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200


def test_round_trip_actions_prompt_stop_restart(server):
    async def go():
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "start", "prompt": "a red brick room", "seed": 3}))
            ready = await recv_json(ws, "ready")
            assert ready["protocol"] == "streamgen-stream/1"
            assert (ready["width"], ready["height"], ready["fps"], ready["chunk_frames"]) == (64, 64, 16, 3)
            assert ready["action_space"]["keys"] == ["W", "A", "S", "D"] and ready["seed"] == 3
            await ws.send(json.dumps({"type": "action", "seq": 41, "keys": ["W", "D"], "mouse": [0.5, -0.25]}))
            t_sent = time.monotonic()
            frames, seqs, lat, stats = [], [], None, None
            while len(frames) < 24:
                msg = await asyncio.wait_for(ws.recv(), 20)
                if isinstance(msg, str):
                    m = json.loads(msg)
                    assert m["type"] in ("stats",), m
                    stats = m
                    continue
                hdr, payload = unpack_header(msg)
                assert hdr.kind == KIND_JPEG and payload[:2] == b"\xff\xd8"
                frames.append(hdr.frame)
                seqs.append(hdr.action_seq)
                if hdr.action_seq == 41 and lat is None:
                    lat = time.monotonic() - t_sent
                if len(frames) == 9:
                    await ws.send(json.dumps({"type": "prompt", "prompt": "an ice cave in fog"}))
            assert frames == list(range(24)), "frames arrive in order with consecutive indices"
            assert 41 in seqs and seqs[-1] == 41, "frames report the action they reflect"
            assert lat is not None and lat < 5
            assert all(s in (None, 41) for s in seqs) and seqs.index(41) % 3 == 0, "applied at a chunk boundary"
            assert stats is not None and {"fps", "chunk_latency_ms", "queue_depth", "dropped_frames"} <= set(stats)
            await ws.send(json.dumps({"type": "stop"}))
            end = await recv_json(ws, "end")
            assert end["reason"] == "stopped" and end["frames"] >= 24
            # the connection stays usable: a new session
            await ws.send(json.dumps({"type": "start", "prompt": "a second stream", "codec": "jpeg"}))
            ready2 = await recv_json(ws, "ready")
            assert ready2["session"] != ready["session"]
            msg = await asyncio.wait_for(ws.recv(), 20)
            while isinstance(msg, str):
                msg = await asyncio.wait_for(ws.recv(), 20)
            assert unpack_header(msg)[0].frame == 0
    asyncio.run(go())


def test_fmp4_stream_decodes(server, tmp_path):
    av = pytest.importorskip("av")
    out = tmp_path / "s.mp4"
    res = asyncio.run(run_client(server.ws_url, "a blue hall", frames=20, codec="fmp4",
                                 actions=ActionPlan(keys=[["W"], ["A"]], change_every=6), out=str(out)))
    assert res["frames"] == 20 and not res["errors"]
    with av.open(str(out)) as c:
        n = sum(1 for _ in c.decode(video=0))
        assert c.streams.video[0].codec_context.name == "h264"
    assert n >= 20
    assert res["action_latency_ms"]["n"] >= 2


def test_fmp4_headers_label_frames(server):
    async def go():
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "start", "prompt": "fragments", "codec": "fmp4"}))
            await recv_json(ws, "ready")
            kinds, idx = [], []
            while len(idx) < 10:
                msg = await asyncio.wait_for(ws.recv(), 20)
                if isinstance(msg, bytes):
                    h, payload = unpack_header(msg)
                    kinds.append(h.kind)
                    if h.kind == KIND_FRAGMENT:
                        idx.append(h.frame)
                        assert payload[4:8] == b"moof"
                    else:
                        assert payload[4:8] == b"ftyp"
            assert kinds[0] == KIND_INIT and idx == list(range(10))
    asyncio.run(go())


def test_eight_sessions_share_one_forward_per_step_and_ninth_is_busy(server):
    b = server.hub.batcher
    steps_per_chunk = len(server.hub.pipe.sampler.timesteps) + 1

    async def one(i, started, release):
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "start", "prompt": f"room number {i}", "seed": i}))
            await recv_json(ws, "ready")
            started.append(i)
            got = 0
            while got < 24 or not release.is_set():
                msg = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(msg, bytes):
                    got += 1
                    if got % 6 == 0:
                        await ws.send(json.dumps({"type": "action", "keys": [["W", "A", "S", "D"][i % 4]]}))
            return got

    async def go():
        started, release = [], asyncio.Event()
        tasks = [asyncio.create_task(one(i, started, release)) for i in range(8)]
        while len(started) < 8:
            await asyncio.sleep(0.02)
        while b.active < 8:
            await asyncio.sleep(0.01)
        f0, s0 = b.forward_calls, b.steps
        async with connect(server.ws_url) as ws:                       # the 9th session
            await ws.send(json.dumps({"type": "start", "prompt": "one too many"}))
            err = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert err["type"] == "error" and err["code"] == "busy" and "8" in err["message"]
            with pytest.raises(Exception):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1013
        t_end = time.monotonic() + 30               # a few steps (a loaded CPU may take a while)
        while b.steps - s0 < 4 and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        f1, s1 = b.forward_calls, b.steps
        release.set()
        counts = await asyncio.gather(*tasks)
        return counts, f1 - f0, s1 - s0

    counts, forwards, steps = asyncio.run(go())
    assert all(c >= 24 for c in counts)
    assert steps >= 3
    # one forward per denoising call for all 8 sessions together (not 8x)
    assert steps * steps_per_chunk - steps_per_chunk <= forwards <= steps * steps_per_chunk + steps_per_chunk
    assert 8 in b.forward_batch and max(b.batch_sizes) == 8
    t0 = time.monotonic()
    while b.active and time.monotonic() - t0 < 2:
        time.sleep(0.01)
    assert b.active == 0 and b.reserved == 0


def test_batched_rows_reproduce_solo_sessions(pipe):
    """Sessions joining at different times, with different prompts/seeds/actions, each get the
    frames a solo Pipeline.session produces (up to float rounding)."""
    b = Batcher(pipe, max_sessions=4, pace=0, admission="degrade")
    got = {i: [] for i in range(3)}
    acts = [{"keys": ["W"], "mouse": [0.0, 0.0]}, {"keys": ["A", "S"], "mouse": [0.3, 0.0]}, None]
    prompts = ["a red room", "a blue sky over hills", "green"]
    b.start()
    try:
        slots = []
        for i in range(3):
            slots.append(b.open(prompts[i], 10 + i, got[i].append, lambda r, m: None))
            b.set_action(slots[-1], acts[i], i)
            t0 = time.monotonic()
            while not got[i] and time.monotonic() - t0 < 10:
                time.sleep(0.005)
        while min(len(v) for v in got.values()) < 6:
            time.sleep(0.01)
        b.close(slots[0])          # row 0 leaves: the last row moves into its place and keeps going
        n2 = len(got[2])
        while len(got[2]) < n2 + 4:
            time.sleep(0.01)
    finally:
        b.stop()
    assert max(b.batch_sizes) == 3
    for i in range(3):
        s = pipe.session(prompts[i], seed=10 + i)
        n = min(len(got[i]), 10)
        for j in range(n):
            ref = s.step(acts[i])
            assert got[i][j].first_frame == 3 * j
            diff = np.abs(got[i][j].frames.astype(int) - ref.astype(int))
            # same math; only float rounding differs with the batch size (uint8 +-1 at .5 boundaries)
            assert diff.max() <= 2 and diff.mean() < 0.05, f"session {i} chunk {j}: max {diff.max()}"


def test_client_cli_streams_keys_to_mp4_and_reports_latency(server, tmp_path, capsys):
    from streamgen.server.client import main
    av = pytest.importorskip("av")
    out = tmp_path / "c.mp4"
    rc = main(["--url", server.ws_url, "--prompt", "a red hall", "--keys", "W,D+W", "--change-every", "4",
               "--frames", "12", "--out", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["frames"] == 12 and res["actions_sent"] >= 3 and not res["errors"]
    assert res["action_latency_ms"]["n"] >= 2 and res["action_latency_ms"]["p50"] > 0
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 12


def test_client_cli_rejects_bad_arguments_before_connecting(tmp_path, capsys):
    from streamgen.server.client import main
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"keys": ["W"]}\n{"keys": 5}\n')
    assert main(["--url", "ws://127.0.0.1:9/x", "--actions", str(bad)]) == 2
    assert "a.jsonl:2" in capsys.readouterr().err
    assert main(["--url", "ws://127.0.0.1:9/x", "--switch-prompt", "x:"]) == 2
    assert main(["--url", "ws://127.0.0.1:9/x", "--frames", "0"]) == 2
