"""`streamgen demo`: the Gradio app launched on 127.0.0.1 and driven with gradio_client.

tiny-world with random weights; start, receive frames as they are generated, press keys,
switch the prompt mid-stream (same stream, no restart), download the MP4, stop, two clients
get two sessions, and a closed client frees its session.
"""
import os
import socket
import time

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "0.25"     # detect closed clients fast (read per request)

gr = pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'streamgen[demo]')")
gradio_client = pytest.importorskip("gradio_client")

from PIL import Image  # noqa: E402

from streamgen.server import demo as demo_mod  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=15.0, every=0.05):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if cond():
            return True
        time.sleep(every)
    return False


@pytest.fixture(scope="module")
def server():
    pipe, notice = demo_mod.load_pipeline("tiny-world", random_weights=True)
    demo = demo_mod.build_demo(pipe, notice=notice, display_size=256)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


def images(outputs):
    return [o[0] for o in outputs if isinstance(o[0], str) and o[0].endswith(".png")]


def the_tab(app, client):
    return app.tabs.get(client.session_hash)


def test_stream_switch_actions_download_stop(server):
    demo, url = server
    app = demo.streamgen_app
    c = gradio_client.Client(url, verbose=False)
    try:
        api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
        for name in ("/start", "/stop", "/switch_prompt", "/download_mp4", "/set_input", "/press_W", "/press_left"):
            assert name in api
        job = c.submit("a brick dungeon at dusk", 7, api_name="/start")
        # frames arrive while the stream runs (not after a whole clip)
        assert wait_for(lambda: len(images(job.outputs())) >= 6, 30), job.outputs()[-3:]
        assert not job.done()
        first = np.asarray(Image.open(images(job.outputs())[-1]).convert("RGB"))
        assert first.shape == (256, 256, 3)            # 64x64 upscaled 4x, nearest neighbour
        assert first.std() > 3, "video frame is blank"
        assert (first[::4, ::4] == first[1::4, 1::4]).all()   # 4x4 blocks: nearest-neighbour
        readout = next(o[1] for o in reversed(job.outputs()) if isinstance(o[1], str))
        assert "generated fps" in readout and "chunk latency" in readout and "frames so far" in readout
        assert "**device** cpu" in readout and "**attention** sdpa" in readout and "RANDOM WEIGHTS" in readout

        tab = the_tab(app, c)
        stream = tab.stream
        assert stream is not None and stream.seed == 7

        # actions: a button click and held keyboard input both reach the next chunk
        c.predict(api_name="/press_W")
        assert wait_for(lambda: any(a["keys"] == ["W"] for _, a in stream.actions), 15)
        c.predict('{"keys": ["A"], "turn": [0.5, 0], "drag": [0, 0]}', api_name="/set_input")
        assert wait_for(lambda: any(a["keys"] == ["A"] and a["mouse"][0] == 0.5 for _, a in stream.actions), 15)
        c.predict('{"keys": [], "turn": [0, 0], "drag": [0, 0]}', api_name="/set_input")

        # prompt switch mid-stream: same engine session, frame count keeps growing
        chunks_before = stream.chunks
        msg = c.predict("an ice cave in fog", api_name="/switch_prompt")
        assert "next chunk" in msg
        assert wait_for(lambda: stream.switches == 1 and stream.prompt == "an ice cave in fog", 15)
        assert tab.stream is stream and stream.chunks >= chunks_before and not job.done()
        n = len(images(job.outputs()))
        assert wait_for(lambda: len(images(job.outputs())) >= n + 3, 15)

        # MP4 of what was generated so far
        from streamgen.video import read_video
        out = c.predict(api_name="/download_mp4")        # a File update: {"value": path, "visible": True}
        path = out["value"] if isinstance(out, dict) else out
        vid = read_video(path)
        assert vid.shape[1:] == (64, 64, 3) and len(vid) >= 3

        # stop ends the event stream and frees the engine session
        out = c.predict(api_name="/stop")
        assert "stopped" in out
        assert wait_for(job.done, 10)
        assert wait_for(stream.done.is_set, 10) and stream.session.cache is None
        assert app.active_streams() == 0
    finally:
        c.close()


def test_tabs_have_own_sessions_and_closing_frees(server):
    demo, url = server
    app = demo.streamgen_app
    a = gradio_client.Client(url, verbose=False)
    b = gradio_client.Client(url, verbose=False)
    try:
        ja = a.submit("a dungeon", 1, api_name="/start")
        jb = b.submit("a forest", 2, api_name="/start")
        assert wait_for(lambda: len(images(ja.outputs())) >= 3 and len(images(jb.outputs())) >= 3, 40)
        ta, tb = the_tab(app, a), the_tab(app, b)
        assert ta is not tb and ta.stream.seed == 1 and tb.stream.seed == 2
        assert ta.stream.session is not tb.stream.session
        a.predict("a volcano", api_name="/switch_prompt")     # only a's stream switches
        assert wait_for(lambda: ta.stream.switches == 1, 15)
        assert tb.stream.switches == 0 and tb.stream.prompt == "a forest"
        sb = tb.stream
        b.close()                                            # "closing the tab": heartbeat drops
        assert wait_for(lambda: b.session_hash not in app.tabs, 15), "closed client's session not freed"
        assert wait_for(sb.done.is_set, 10) and sb.session.cache is None
        assert ta.stream is not None and ta.stream.running   # the other tab keeps streaming
        a.predict(api_name="/stop")
        assert wait_for(ja.done, 10)
    finally:
        a.close()
        b.close()


def test_idle_stream_is_freed(server):
    """A stream nobody pulls frames from (client vanished without unload) is freed."""
    demo, url = server
    app = demo.streamgen_app
    tab = demo_mod.TabState()
    tab.space = app.info["action_space"]
    tab.session_hash = "vanished-tab"
    with app.tabs_lock:
        app.tabs[tab.session_hash] = tab
    old, app.idle_timeout = app.idle_timeout, 0.5
    try:
        s = demo_mod.Stream(app, tab, "a dungeon", 0)
        tab.stream = s
        assert wait_for(s.done.is_set, 15) and s.session.cache is None
        assert s.frames_generated > 0 and s.idle_released
        assert wait_for(lambda: "vanished-tab" not in app.tabs, 5), "idle tab left in the registry"
    finally:
        app.idle_timeout = old


def test_main_rejects_bad_args(capsys):
    with pytest.raises(SystemExit):
        demo_mod.main(["--port", "notaport"])
    assert "streamgen demo" in capsys.readouterr().err
