"""Hostile input against a real server on 127.0.0.1: every message gets a protocol error code (never
a 1006 close, never a traceback in the log), the sender's session and a bystander keep streaming;
tokens never reach the log; the prompt encoder is silent; the `start` field of the start message."""
import asyncio
import json
import logging

import httpx
import pytest

pytest.importorskip("fastapi")
from websockets.asyncio.client import connect  # noqa: E402

from streamgen.io.actions import validate_action  # noqa: E402
from streamgen.config import ActionSpace  # noqa: E402
from streamgen.errors import ActionError, PromptError  # noqa: E402
from streamgen.engine.pipeline import Pipeline  # noqa: E402
from streamgen.server.app import create_app  # noqa: E402
from streamgen.server.cli import ServerThread  # noqa: E402
from streamgen.server.media import unpack_header  # noqa: E402
from streamgen.codecs.text import check_prompt  # noqa: E402
from server_helpers import tiny_world_pipe, running_server, next_json  # noqa: E402

CODES = {"bad_json", "unknown_type", "bad_action", "bad_prompt", "bad_codec", "bad_request", "bad_message",
         "bad_start", "not_started", "already_started", "too_large", "rate_limited", "busy", "unauthorized",
         "shutting_down"}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def text(self):
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture()
def server_logs():
    h = Records()
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "streamgen.server")
    for n in names:
        logging.getLogger(n).addHandler(h)
    yield h
    for n in names:
        logging.getLogger(n).removeHandler(h)


@pytest.fixture(scope="module")
def pipe():
    return tiny_world_pipe()


@pytest.fixture(scope="module")
def server(pipe):
    with running_server(pipe, max_sessions=4, pace=4.0, rate_limit=100, stats_interval=60, admission="degrade") as srv:
        yield srv


async def frames(ws, n, timeout=30):
    """The next n frame headers (JSON messages in between must not be `end`)."""
    out = []
    while len(out) < n:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, bytes):
            out.append(unpack_header(msg)[0].frame)
        else:
            m = json.loads(msg)
            assert m["type"] == "stats", m
    return out


def test_engine_validators_refuse_what_json_allows():
    with pytest.raises(PromptError, match="surrogate"):
        check_prompt("\ud800 x")
    assert check_prompt("  ok \u00e9\U0001F600 ") == "ok \u00e9\U0001F600"
    space = ActionSpace(keys=("W",), mouse=True)
    for bad in ([10**400, 0], [0, -10**400]):
        with pytest.raises(ActionError):
            validate_action(space, {"keys": [], "mouse": bad})
    with pytest.raises(ActionError) as e:
        validate_action(space, {"keys": ["Q" * 1000] * 50})
    assert len(str(e.value)) < 400


def test_hostile_messages_get_error_codes_and_nothing_ends(server, server_logs):
    big = "9" * 5000                                   # over Python's 4300-digit int limit
    before_start = [
        ('{"type":"start","prompt":"a cave","seed":' + big + '}', "bad_json"),
        (json.dumps({"type": "start", "prompt": "\ud800 x"}), "bad_prompt"),
        (json.dumps({"type": "start", "prompt": "\udfff"}), "bad_prompt"),
        (json.dumps({"type": "start", "prompt": ["a", "list"]}), "bad_prompt"),
        (json.dumps({"type": "start", "prompt": "a cave", "seed": 2**64}), "bad_request"),
        (json.dumps({"type": "start", "prompt": "a cave", "seed": 1e308}), "bad_request"),
        (json.dumps({"type": "start", "prompt": "a cave", "start": "fire"}), "bad_start"),
        (json.dumps({"type": "start", "prompt": "a cave", "start": ["world"]}), "bad_start"),
        (json.dumps({"type": "start", "prompt": "a cave", "codec": "x" * 20000}), "bad_codec"),
        (json.dumps({"type": "start", "prompt": "a cave", "x" * 3000: 1}), "bad_request"),
        ('{"type":"prompt","prompt":' + big + '}', "bad_json"),
    ]
    after_start = [
        (json.dumps({"type": "action", "keys": [], "mouse": [10**400, 0]}), "bad_action"),
        ('{"type":"action","keys":[],"mouse":[' + big + ',0]}', "bad_json"),
        ('{"type":"action","keys":[],"mouse":[Infinity,0]}', "bad_action"),
        ('{"type":"action","keys":[],"mouse":[NaN,0]}', "bad_action"),
        (json.dumps({"type": "action", "keys": [{"W": 1}]}), "bad_action"),
        (json.dumps({"type": "action", "keys": ["W"], "seq": 10**100}), "bad_action"),
        (json.dumps({"type": "action", "keys": ["W"], "seq": 1.5}), "bad_action"),
        (json.dumps({"type": "prompt", "prompt": "\ud800 x"}), "bad_prompt"),
        (json.dumps({"type": "prompt", "prompt": 12}), "bad_prompt"),
        (json.dumps({"type": "prompt", "prompt": "y" * 2001}), "bad_prompt"),
        (json.dumps({"type": 5}), "bad_json"),
        (json.dumps({"type": "x" * 1000}), "unknown_type"),
        ("[" * 60000, "bad_json"),
        ("null", "bad_json"),
        ('"just a string"', "bad_json"),
        ("", "bad_json"),
        ("{\"type\": \"action\", \"keys\": [\"W\"]" + "}" * 3, "bad_json"),
    ]

    async def go():
        async with connect(server.ws_url) as ws, connect(server.ws_url) as other:
            await other.send(json.dumps({"type": "start", "prompt": "the bystander"}))
            assert (await next_json(other))["type"] == "ready"
            for payload, code in before_start:
                await ws.send(payload)
                e = await next_json(ws)
                assert e["type"] == "error" and e["code"] == code, (payload[:60], e)
                assert e["code"] in CODES and e["message"] and len(e["message"]) < 600
            await ws.send(json.dumps({"type": "start", "prompt": "a cave"}))
            ready = await next_json(ws)
            assert ready["type"] == "ready", ready
            await frames(ws, 3)
            for payload, code in after_start:
                await ws.send(payload)
                e = await next_json(ws)
                assert e["type"] == "error" and e["code"] == code, (payload[:60], e)
                assert len(e["message"]) < 600
            # the session lives on (no `end`, no close), and so does the bystander
            f = await frames(ws, 6)
            assert f == sorted(f)
            g = await frames(other, 6)           # (it was not read meanwhile: drop-oldest may leave gaps)
            assert g == sorted(g) and len(set(g)) == 6
            assert ws.close_code is None and other.close_code is None
        async with connect(server.ws_url) as bad:        # a text frame that is not UTF-8: documented close
            await bad.send(b"\xff\xfe{", text=True)
            with pytest.raises(Exception):
                await asyncio.wait_for(bad.recv(), 10)
            assert bad.close_code == 1007
    asyncio.run(go())
    bad = [r for r in server_logs.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def test_tokens_never_reach_the_log(pipe):
    app = create_app(pipe, max_sessions=1, token="s3cret-T0KEN", pace=4.0, admission="degrade", calibrate=False)
    srv = ServerThread(app, log_level="info")     # uvicorn configures its loggers here: listen after it
    h = Records()
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "streamgen.server")
    for n in names:
        logging.getLogger(n).addHandler(h)
    try:
        with srv:
            assert httpx.get(srv.url + "/v1/models?token=s3cret-T0KEN").status_code == 200
            assert httpx.get(srv.url + "/metrics?x=1&token=wrong-one").status_code == 401

            async def go():
                async with connect(srv.ws_url + "?token=s3cret-T0KEN") as ws:
                    await ws.send(json.dumps({"type": "start", "prompt": "logged"}))
                    assert (await next_json(ws))["type"] == "ready"
            asyncio.run(go())
    finally:
        for n in names:
            logging.getLogger(n).removeHandler(h)
    text = h.text()
    assert "/v1/models?token=***" in text and "WebSocket /v1/stream?token=***" in text, text[-500:]
    assert "s3cret-T0KEN" not in text and "wrong-one" not in text


def test_prompt_encoder_is_silent():
    """sentence-transformers draws a progress bar per encode when logging is at INFO, unless told not to."""
    import torch

    from streamgen.codecs.text import MiniLMTextEncoder

    class Model:
        def __init__(self):
            self.kwargs = []

        def encode(self, prompt, **kw):
            self.kwargs.append(kw)
            return torch.zeros(len(prompt.split()), 384)

    enc = object.__new__(MiniLMTextEncoder)
    enc.model, enc.text_len, enc._memo = Model(), 16, {}
    assert enc("two words").shape == (1, 16, 384)
    assert enc.model.kwargs[0].get("show_progress_bar") is False


def test_start_field(server):
    async def start(ws, **kw):
        await ws.send(json.dumps({"type": "start", "prompt": "a brick dungeon", "seed": 5, **kw}))
        return await next_json(ws)

    async def go():
        async with connect(server.ws_url) as ws:
            r = await start(ws)                              # default for a 64x64 world model
            assert r["type"] == "ready" and r["start"] == "world renderer", r
            assert (await frames(ws, 3)) == [0, 1, 2], "frame indices count generated frames"
            await ws.send(json.dumps({"type": "stop"}))
            assert (await next_json(ws))["type"] == "end"
            r = await start(ws, start="noise")
            assert r["type"] == "ready" and r["start"] == "noise"
            await ws.send(json.dumps({"type": "stop"}))
            assert (await next_json(ws))["type"] == "end"
            r = await start(ws, start="world")
            assert r["start"] == "world renderer" and "realtime_factor" in r and r["capacity"] >= 1
            await frames(ws, 3)
    asyncio.run(go())


def test_start_world_needs_a_world_model():
    pipe = Pipeline.from_pretrained("tiny", random_weights=True)          # no action space
    app = create_app(pipe, max_sessions=1, pace=4.0, admission="degrade", calibrate=False)
    with ServerThread(app) as srv:
        async def go():
            async with connect(srv.ws_url) as ws:
                await ws.send(json.dumps({"type": "start", "prompt": "x", "start": "world"}))
                e = await next_json(ws)
                assert e["code"] == "bad_start" and "world model" in e["message"]
                await ws.send(json.dumps({"type": "start", "prompt": "x"}))
                r = await next_json(ws)
                assert r["type"] == "ready" and r["start"] == "noise"
        asyncio.run(go())
