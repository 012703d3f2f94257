"""Shared pieces of the server tests: a tiny-world pipeline, a real server thread, JSON reads."""
import asyncio
import contextlib
import json
import time


def tiny_world_pipe():
    from streamgen.engine.pipeline import Pipeline
    return Pipeline.from_pretrained("tiny-world", random_weights=True)


@contextlib.contextmanager
def running_server(pipe, **app_options):
    """A uvicorn server on 127.0.0.1 for ``create_app(pipe, **app_options)``; ``srv.hub`` is its hub."""
    from streamgen.server.app import create_app
    from streamgen.server.cli import ServerThread
    app = create_app(pipe, **app_options)
    with ServerThread(app) as srv:
        srv.hub = app.state.hub
        yield srv


async def next_json(ws, timeout=20):
    """The next JSON message that is not ``stats`` (binary frames are skipped)."""
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, str):
            m = json.loads(msg)
            if m["type"] != "stats":
                return m


async def recv_json(ws, want, timeout=20):
    """The next JSON message of type ``want`` within ``timeout`` seconds in all."""
    t_end = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, t_end - time.monotonic()))
        if isinstance(msg, str):
            m = json.loads(msg)
            if m["type"] == want:
                return m
