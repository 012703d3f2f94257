"""The bounded control path, slow readers, health, metrics and capacity-aware admission.

Timed checks use wide margins (a loaded 2-core CPU); the fairness *target* (>= 0.9x fps, gaps
<= 2 chunk periods) belongs to benchmarks/server_fairness.py, not to these tests.
"""
import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
from websockets.asyncio.client import connect  # noqa: E402

from streamgen.engine.pipeline import Pipeline  # noqa: E402
from streamgen.server.app import create_app  # noqa: E402
from streamgen.server.batcher import Batcher  # noqa: E402
from streamgen.server.cli import ServerThread  # noqa: E402
from streamgen.server.control import Prep, StepModel  # noqa: E402
from server_helpers import tiny_world_pipe, next_json  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_world_pipe()


class SlowEncoder:
    """Wraps a text encoder: every call sleeps (an expensive encoder without using the CPU) and
    records the thread it ran on."""

    def __init__(self, inner, delay):
        self.inner, self.delay, self.calls = inner, delay, []

    def __call__(self, prompt):
        self.calls.append((threading.current_thread().name, prompt))
        time.sleep(self.delay)
        return self.inner(prompt)


def test_prep_coalesces_and_serves_sessions_round_robin():
    class S:
        def __init__(self, name):
            self.name, self.closed, self.queued, self.want_join, self.want_prompt = name, False, False, False, None

    p = Prep(None, None, None)
    a, b = S("a"), S("b")
    for i in range(50):                    # a floods, b sends one message in the middle
        p.submit_prompt(a, f"a{i}")
        if i == 25:
            p.submit_prompt(b, "b0")
    jobs = []
    while (j := p._take()) is not None:
        jobs.append((j[0].name, j[2]))
    assert jobs == [("a", "a49"), ("b", "b0")], "latest prompt wins; b waits behind one job of a at most"
    assert p.coalesced == 49 and p.depth == 0
    p.submit_join(a)
    p.submit_prompt(a, "late")
    p.submit_prompt(b, "b1")
    a.closed = True                        # a closed session's work is dropped
    assert [(j[0].name, j[1]) for j in iter(p._take, None)] == [("b", "prompt")]


def test_step_model_predicts_and_caps_capacity():
    m = StepModel(max_sessions=8)
    assert m.predict(3) is None and m.capacity(100) == 8
    m.ms.update({1: 20.0, 4: 80.0})
    assert m.predict(1) == 20 and m.predict(2) == pytest.approx(40) and m.predict(8) == pytest.approx(160)
    assert m.capacity(100) == 5 and m.capacity(10) == 1        # at least one session is always admitted
    m.observe(4, 180.0)
    assert 80 < m.predict(4) < 180


def test_prompt_flood_is_encoded_off_the_generation_thread_and_coalesced(pipe):
    """One client floods distinct prompt switches while every encode costs 0.25 s: the encodes run
    on the control worker (never the generation thread), most are coalesced away, the latest
    prompt wins, and the other session keeps getting frames."""
    own = Pipeline.from_pretrained("tiny-world", random_weights=True)
    slow = own.text_encoder = SlowEncoder(own.text_encoder, 0.25)
    app = create_app(own, max_sessions=2, pace=1.0, admission="degrade", stats_interval=60)
    hub = app.state.hub
    with ServerThread(app) as srv:
        async def go():
            async with connect(srv.ws_url) as a, connect(srv.ws_url) as b:
                await b.send(json.dumps({"type": "start", "prompt": "the bystander", "start": "noise"}))
                await a.send(json.dumps({"type": "start", "prompt": "the flooder", "start": "noise"}))
                assert (await next_json(b))["type"] == "ready" and (await next_json(a))["type"] == "ready"
                arrivals = []

                async def read_b(seconds):
                    t_end = time.monotonic() + seconds
                    while time.monotonic() < t_end:
                        try:
                            msg = await asyncio.wait_for(b.recv(), max(0.01, t_end - time.monotonic()))
                        except asyncio.TimeoutError:
                            break
                        if isinstance(msg, bytes):
                            arrivals.append(time.monotonic())

                async def drain_a():
                    try:
                        while True:
                            await a.recv()
                    except Exception:
                        pass

                async def flood():
                    for i in range(60):                          # 3 s at 20/s
                        words = " ".join(f"w{i}x{j}" for j in range(200))[:1900]
                        await a.send(json.dumps({"type": "prompt", "prompt": words}))
                        await asyncio.sleep(0.05)
                    await a.send(json.dumps({"type": "prompt", "prompt": "the final prompt"}))

                reader = asyncio.ensure_future(drain_a())
                while not arrivals:
                    await read_b(1.0)
                await asyncio.gather(flood(), read_b(6.0))
                slot_a = [c.slot for c in hub.connections if c.slot is not None and c.slot.prompt != "the bystander"]
                t_end = time.monotonic() + 20
                while slot_a and slot_a[0].prompt != "the final prompt" and time.monotonic() < t_end:
                    await read_b(0.2)
                await read_b(0.5)
                reader.cancel()
                return arrivals + [time.monotonic()], slot_a[0].prompt if slot_a else None
        arrivals, final = asyncio.run(go())
    threads = {t for t, _ in slow.calls}
    assert "streamgen-batcher" not in threads, threads
    flood_encodes = [p for _, p in slow.calls if p.startswith("w")]
    assert len(flood_encodes) < 40, f"{len(flood_encodes)} of 60 switches encoded: not coalesced"
    assert final == "the final prompt"
    gaps = np.diff(arrivals)                  # incl. the time from the last frame to the end of watching
    # a chunk is 0.19 s of video; encoding the flood on the generation thread stalls it for > 10 s
    assert len(arrivals) > 12 and gaps.max() < 4.0, f"bystander gap {gaps.max():.2f} s"
    assert hub.batcher.prep.coalesced > 10


def test_client_that_stops_reading_is_ended_and_its_slot_freed(pipe):
    app = create_app(pipe, max_sessions=2, pace=4.0, max_queue_frames=6, slow_reader_s=1.0,
                     admission="degrade", calibrate=False, stats_interval=60)
    hub = app.state.hub
    with ServerThread(app) as srv:
        async def go():
            async with connect(srv.ws_url) as ws:
                await ws.send(json.dumps({"type": "start", "prompt": "I stop reading", "start": "noise"}))
                assert (await next_json(ws))["type"] == "ready"
                while not any(c.slot is not None for c in hub.connections):
                    await asyncio.sleep(0.01)
                conn = [c for c in hub.connections if c.slot is not None][0]
                while conn.sent < 2:
                    await asyncio.sleep(0.01)

                async def never_completes(data):        # what a client that stopped reading does to send()
                    await asyncio.sleep(3600)
                conn.send_bytes = never_completes
                t0 = time.monotonic()
                end = await next_json(ws, timeout=60)
                freed = None
                while freed is None and time.monotonic() - t0 < 30:
                    if hub.batcher.reserved == 0 and hub.batcher.active == 0:
                        freed = time.monotonic() - t0
                    await asyncio.sleep(0.02)
                with pytest.raises(Exception):
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                return end, ws.close_code, freed
        end, code, freed = asyncio.run(go())
        text = httpx.get(srv.url + "/metrics").text
    assert end["type"] == "end" and end["reason"] == "slow_reader", end
    assert code == 4001
    assert freed is not None
    assert "streamgen_slow_reader_ends_total 1" in text


def test_client_that_stops_reading_its_socket_is_closed_and_its_slot_freed(pipe):
    """A real client that stops reading (its library pauses the socket after one message): the
    server's keepalive (every slow_reader_s) gets no pong, closes it, and the slot is freed —
    long before kernel buffers would fill or the 40 s default keepalive."""
    app = create_app(pipe, max_sessions=2, pace=4.0, slow_reader_s=1.0, admission="degrade", calibrate=False,
                     stats_interval=60)
    b = app.state.hub.batcher
    with ServerThread(app) as srv:
        async def go():
            ws = await connect(srv.ws_url, max_queue=1, ping_interval=None)
            try:
                await ws.send(json.dumps({"type": "start", "prompt": "then I stop reading", "start": "noise"}))
                t_end = time.monotonic() + 30
                while b.active == 0 and time.monotonic() < t_end:
                    await asyncio.sleep(0.02)
                assert b.active == 1
                t0 = time.monotonic()
                while (b.reserved or b.active) and time.monotonic() - t0 < 20:
                    await asyncio.sleep(0.05)
                return time.monotonic() - t0, b.reserved, b.active
            finally:
                ws.transport.abort()
        freed, reserved, active = asyncio.run(go())
    assert reserved == 0 and active == 0 and freed < 15, f"slot held {freed:.1f} s"


def test_healthz_turns_503_when_steps_stop(pipe):
    app = create_app(pipe, max_sessions=1, pace=4.0, health_stall_s=0.5, admission="degrade", calibrate=False)
    gate = threading.Event()
    gate.set()
    with ServerThread(app) as srv:
        hook = pipe.model.register_forward_pre_hook(lambda m, a: gate.wait(60) and None)
        try:
            async def go():
                async with connect(srv.ws_url) as ws:
                    await ws.send(json.dumps({"type": "start", "prompt": "watch me", "start": "noise"}))
                    assert (await next_json(ws))["type"] == "ready"
                    while not isinstance(await asyncio.wait_for(ws.recv(), 30), bytes):
                        pass
                    assert httpx.get(srv.url + "/healthz").status_code == 200
                    gate.clear()                               # the generation thread hangs in a forward
                    t_end = time.monotonic() + 30
                    r = httpx.get(srv.url + "/healthz")
                    while r.status_code == 200 and time.monotonic() < t_end:
                        await asyncio.sleep(0.1)
                        r = httpx.get(srv.url + "/healthz")
                    stalled = (r.status_code, r.json())
                    gate.set()
                    t_end = time.monotonic() + 30
                    while httpx.get(srv.url + "/healthz").status_code != 200 and time.monotonic() < t_end:
                        await asyncio.sleep(0.1)
                    return stalled, httpx.get(srv.url + "/healthz").status_code
            (code, body), after = asyncio.run(go())
        finally:
            gate.set()
            hook.remove()
    assert code == 503 and body["status"] == "stalled" and "no generation step" in body["reason"], body
    assert after == 200


def test_admission_refuses_what_cannot_run_in_real_time_or_reports_degradation():
    """Each forward sleeps 25 ms per row, so one step (5 forwards) takes >= 125 ms per session
    against a 188 ms chunk: this machine serves one session in real time, whatever its load."""
    own = Pipeline.from_pretrained("tiny-world", random_weights=True)
    own.model.register_forward_pre_hook(lambda m, a: time.sleep(0.025 * a[0].shape[0]) or None)

    async def two(url):
        async with connect(url) as a, connect(url) as b:
            await a.send(json.dumps({"type": "start", "prompt": "first", "start": "noise"}))
            ra = await next_json(a)
            await b.send(json.dumps({"type": "start", "prompt": "second", "start": "noise"}))
            rb = await next_json(b)
            if rb["type"] == "error":
                with pytest.raises(Exception):
                    await asyncio.wait_for(b.recv(), 10)
            return ra, rb, b.close_code

    app = create_app(own, max_sessions=3, pace=1.0, stats_interval=60)              # admission="realtime"
    with ServerThread(app) as srv:
        ra, rb, code = asyncio.run(two(srv.ws_url))
        metrics = httpx.get(srv.url + "/metrics").text
        health = httpx.get(srv.url + "/healthz").json()
    assert ra["type"] == "ready" and ra["capacity"] == 1 and ra["admission"] == "realtime"
    assert rb["type"] == "error" and rb["code"] == "busy" and "real time" in rb["message"], rb
    assert code == 1013
    assert 'streamgen_sessions_refused_total{reason="capacity"} 1' in metrics
    assert "streamgen_capacity_sessions 1" in metrics and "streamgen_sessions_admitted_total 1" in metrics
    for name in ("streamgen_step_seconds{quantile=\"0.5\"}", "streamgen_realtime_factor",
                 'streamgen_send_queue_frames{stat="max"}', "streamgen_control_queue_sessions",
                 'streamgen_step_seconds_by_batch{batch="1"}'):
        assert name in metrics, name
    assert health["capacity"] == 1

    app = create_app(own, max_sessions=3, pace=1.0, stats_interval=60, admission="degrade")
    with ServerThread(app) as srv:
        ra, rb, code = asyncio.run(two(srv.ws_url))
    assert rb["type"] == "ready" and rb["admission"] == "degrade"
    assert rb["realtime_factor"] < 1.0, rb            # >= 250 ms per step of a 188 ms chunk


def test_batched_world_openings_reproduce_solo_sessions(pipe):
    """Rows that opened on the world renderer's chunk (written into their cache rows) next to a
    row from noise give the frames of solo sessions opened the same way."""
    b = Batcher(pipe, max_sessions=3, pace=0, admission="degrade", calibrate=False)
    specs = [("a red room", 3, None), ("a blue hall", 4, "world"), ("green", 5, "world")]
    got = {i: [] for i in range(3)}
    b.start()
    try:
        for i, (prompt, seed, start) in enumerate(specs):
            slot = b.open(prompt, seed, got[i].append, lambda r, m: None, start=start)
            b.set_action(slot, {"keys": ["W"], "mouse": [0.1 * i, 0.0]}, None)
        t_end = time.monotonic() + 120
        while min(len(v) for v in got.values()) < 4 and time.monotonic() < t_end:
            time.sleep(0.01)
    finally:
        b.stop()
    for i, (prompt, seed, start) in enumerate(specs):
        s = pipe.session(prompt, seed=seed, start=start)
        assert s.start_source == ("world renderer" if start else "noise")
        for j in range(4):
            ref = s.step({"keys": ["W"], "mouse": [0.1 * i, 0.0]})
            diff = np.abs(got[i][j].frames.astype(int) - ref.astype(int))
            assert got[i][j].first_frame == 3 * j
            assert diff.max() <= 2 and diff.mean() < 0.05, f"session {i} chunk {j}: max {diff.max()}"
    noise_ref = pipe.session("a blue hall", seed=4).step({"keys": ["W"], "mouse": [0.1, 0.0]})
    assert np.abs(got[1][0].frames.astype(int) - noise_ref.astype(int)).mean() > 1, "the opening mattered"
