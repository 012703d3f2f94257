"""`streamgen demo`: the Gradio app launched on 127.0.0.1 and driven with gradio_client.

tiny-world with random weights; start, receive frames as they are generated, press keys,
switch the prompt mid-stream (same stream, no restart), download the MP4, stop, two clients
get two sessions, and a closed client frees its session. The ground-truth panel is the world
itself, frame for frame; the page can serve before the model is loaded.
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

pytestmark = pytest.mark.timeout(600)      # generous: a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=15.0, every=0.05):
    timeout *= 3                     # generous: the suite runs on a loaded 2-core machine
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
    demo_mod.launch(demo, "127.0.0.1", port)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


def client(url):
    # no download of every streamed frame: on a loaded machine the client falls minutes behind
    return gradio_client.Client(url, verbose=False, download_files=False)


def path_of(x):
    """A file output: a local path, or (download_files=False) FileData whose path is on this machine."""
    return x.get("path") if isinstance(x, dict) else x


def images(outputs, i=0):
    """Frames of the /start stream; outputs are (model frame, ground truth, readout, status)."""
    out = [path_of(o[i]) for o in outputs]
    return [p for p in out if isinstance(p, str) and p.endswith(".png")]


def readouts(outputs):
    return [o[2] for o in outputs if isinstance(o[2], str)]


def the_tab(app, client):
    return app.tabs.get(client.session_hash)


def test_stream_switch_actions_download_stop(server):
    demo, url = server
    app = demo.streamgen_app
    c = client(url)
    try:
        api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
        for name in ("/start", "/stop", "/switch_prompt", "/download_mp4", "/set_input", "/press_W", "/press_left"):
            assert name in api
        c.predict(False, api_name="/show_truth")        # model frames only (the panel has its own test)
        job = c.submit("a brick dungeon at dusk", 7, "noise", api_name="/start")
        # frames arrive while the stream runs (not after a whole clip)
        assert wait_for(lambda: len(images(job.outputs())) >= 6, 30), job.outputs()[-3:]
        assert not job.done()
        first = np.asarray(Image.open(images(job.outputs())[-1]).convert("RGB"))
        assert first.shape == (256, 256, 3)            # 64x64 upscaled 4x, nearest neighbour
        assert first.std() > 3, "video frame is blank"
        assert (first[::4, ::4] == first[1::4, 1::4]).all()   # 4x4 blocks: nearest-neighbour
        readout = readouts(job.outputs())[-1]
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
        from streamgen.io.video import read_video
        out = c.predict("native", api_name="/download_mp4")   # a File update: {"value": path, "label": ...}
        vid = read_video(path_of(out["value"]))
        assert vid.shape[1:] == (64, 64, 3) and len(vid) >= 3
        assert f"MP4: {len(vid)} frames, 64x64 (native size)" in out["label"]

        # stop ends the event stream and frees the engine session; the readout counts what the MP4 holds
        readout, status = c.predict(api_name="/stop")
        assert "stopped" in readout and "queued" not in status
        assert wait_for(job.done, 60)
        n = int(readout.split("**frames so far** ")[1].split()[0])
        out = c.predict("nearest", api_name="/download_mp4")
        vid = read_video(path_of(out["value"]))
        assert len(vid) == n and f"{n}f" in os.path.basename(path_of(out["value"])), (n, out)
        assert vid.shape[1:] == (256, 256, 3) and "4x nearest-neighbour" in out["label"]
        assert "switched at frame" in status
        assert wait_for(stream.done.is_set, 10) and stream.session.cache is None
        assert app.active_streams() == 0
    finally:
        c.close()


def test_tabs_have_own_sessions_and_closing_frees(server):
    demo, url = server
    app = demo.streamgen_app
    a = client(url)
    b = client(url)
    try:
        a.predict(False, api_name="/show_truth")
        b.predict(False, api_name="/show_truth")
        ja = a.submit("a dungeon", 1, "noise", api_name="/start")
        jb = b.submit("a forest", 2, "world", api_name="/start")
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
        assert wait_for(ja.done, 60)
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
        s = demo_mod.Stream(app.stream_settings(), tab, "a dungeon", 0)
        tab.stream = s
        assert wait_for(s.done.is_set, 15) and s.session.cache is None
        assert s.frames_generated > 0 and s.idle_released
        assert wait_for(lambda: "vanished-tab" not in app.tabs, 5), "idle tab left in the registry"
    finally:
        app.idle_timeout = old


def test_closed_tab_stays_freed(server):
    """A closed page's events still in flight after gradio's unload (the blur's input update, a
    click, a Start) neither register its tab again nor start a stream; and a stream whose event
    generator gradio closed (its client disconnected) frees its tab without any unload."""
    import itertools
    import types
    demo, _ = server
    app = demo.streamgen_app
    for name, unload in (("unloaded-tab", True), ("disconnected-tab", False)):
        req, tab = types.SimpleNamespace(session_hash=name), demo_mod.TabState()
        gen = app.start("a dungeon", 0, tab, req, start="noise")
        try:
            assert any(isinstance(out[0], np.ndarray) for out in gen)      # up to the first frame
            stream = tab.stream
            assert app.tabs.get(name) is tab and stream.running
            if unload:
                app.unload(req)
                app.set_input('{"keys": ["W"], "turn": [0, 0], "drag": [0, 0]}', tab, req)
                app.press("W", tab, req)
                app.stop(tab, req)
                late = app.start("a dungeon", 1, tab, req, start="noise")
                try:
                    assert list(itertools.islice(late, 3)) == [], "a closed tab started a stream"
                finally:
                    late.close()
                assert tab.closed and tab.stream is None
            else:
                gen.close()                          # what gradio does when the client went away
            assert name not in app.tabs, "closed tab's session was not freed"
            assert wait_for(stream.done.is_set, 10) and stream.session.cache is None
        finally:
            gen.close()
    assert app.active_streams() == 0


def test_main_rejects_bad_args(capsys):
    with pytest.raises(SystemExit):
        demo_mod.main(["--port", "notaport"])
    assert "streamgen demo" in capsys.readouterr().err


def test_ground_truth_panel_is_the_world_frame_for_frame(server):
    """World start: the model and the world open on the same frames, and the ground-truth panel is
    the world stepped with the same look, seed and per-chunk actions."""
    from streamgen.world.episodes import opening_frames
    demo, url = server
    app = demo.streamgen_app
    prompt = "an ice cave at night, thick fog"
    c = client(url)
    try:
        job = c.submit(prompt, 3, "world", api_name="/start")
        assert wait_for(lambda: len(images(job.outputs())) >= 4, 30)
        stream = the_tab(app, c).stream
        assert stream.start_source == "world renderer" and stream.n_open == 3
        c.predict('{"keys": ["W"], "turn": [0.5, 0], "drag": [0, 0]}', api_name="/set_input")
        assert wait_for(lambda: len(images(job.outputs())) >= 18, 40)
        c.predict(api_name="/stop")
        assert wait_for(job.done, 60)
        outs = job.outputs()
        model = [np.asarray(Image.open(p).convert("RGB"))[::4, ::4] for p in images(outs, 0)]
        truth = [np.asarray(Image.open(p).convert("RGB"))[::4, ::4] for p in images(outs, 1)]
        assert len(model) == len(truth) >= 18                    # one ground-truth frame per model frame
        want, ws = opening_frames(prompt, 3, 3, 64)
        for i in range(3):                                       # the model's first frames are the world's
            assert (model[i] == want[i]).all() and (truth[i] == want[i]).all()
        acts = list(stream.chunk_actions)
        assert any(a["keys"] == ["W"] for a in acts)
        replay = [want]
        for a in acts:
            ws.chunk = 3
            replay.append(ws.step(stream._world_action(a)))
        replay = np.concatenate(replay)
        assert len(replay) >= len(truth)
        for i, t in enumerate(truth):
            assert (t == replay[i]).all(), f"ground-truth frame {i} is not the world's"
        assert not (np.stack(truth[3:]) == np.stack(model[3:])).all()   # the panel is not the model
    finally:
        c.close()


def test_page_serves_before_the_model_loads(server):
    """`streamgen demo` serves the page first: the app builds from the config alone and Start waits
    for the model, saying so, then streams."""
    import threading
    from streamgen.config import PipelineConfig
    demo, _ = server
    pipe = demo.streamgen_app.pipe
    info = demo_mod.describe_config(PipelineConfig.from_name("tiny-world"), "tiny-world", False, "cpu",
                                    "float32", "sdpa")
    app = demo_mod.DemoApp(None, info=info, idle_timeout=10)
    blocks = app.build()                                         # no pipeline needed for the page
    assert blocks.streamgen_app is app and not app.ready.is_set()
    tab = demo_mod.TabState()
    gen = app.start("a dungeon", 0, tab, None, start="world")
    try:
        assert "loading the model" in next(gen)[2]
        threading.Timer(0.5, app.set_pipeline, args=(pipe,)).start()
        for out in gen:
            if isinstance(out[0], np.ndarray):
                break
        assert isinstance(out[0], np.ndarray) and tab.stream.start_source == "world renderer"
    finally:
        tab.close(wait=10)
        gen.close()


def test_look_pickers_write_prompts_the_world_understands():
    from streamgen.world.scene import THEMES, TIMES, WEATHERS, Look, parse_prompt
    for th in THEMES:
        for ti in TIMES:
            for we in WEATHERS:
                assert parse_prompt(demo_mod.look_prompt(th, ti, we)) == Look(th, ti, we)


def test_bad_input_is_a_toast_not_a_traceback(server, capfd):
    demo, url = server
    c = client(url)
    try:
        with pytest.raises(Exception, match="the limit is 2000"):
            c.predict("x" * 2500, 1, "noise", api_name="/start")
    finally:
        c.close()
    err = capfd.readouterr().err
    assert "error shown in the page: prompt is 2500 characters; the limit is 2000" in err
    assert "Traceback" not in err
