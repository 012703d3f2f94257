"""`streamgen demo` in a real browser: headless Chromium (Debian's `chromium`) over the DevTools
protocol. The page auto-starts (``?autostart=1``), frames stream in, keyboard capture reaches the
session (W held -> next chunk's action), a screenshot shows a non-blank video frame and the
controls, the ground-truth panel shows the world beside the model, a prompt switch's "queued"
line gives way to where it happened and does not outlive Stop, the MP4 holds the frames the
readout counts, and closing the tab frees the session.

Chromium is installed with apt when missing (root + apt-get); the test skips, saying why, only
if that is impossible. Regenerate the README screenshot with:

    STREAMGEN_DEMO_SCREENSHOT=docs/demo.png python -m pytest tests/test_demo_browser.py
"""
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "0.25"

pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'streamgen[demo]')")
ws_sync = pytest.importorskip("websockets.sync.client", reason="needs websockets (a gradio dependency)")

from PIL import Image  # noqa: E402

from streamgen.server import demo as demo_mod  # noqa: E402

pytestmark = pytest.mark.timeout(420)      # generous: a loaded 2-core machine

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0",
                  "--window-size=1280,1000"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def ensure_chromium() -> str:
    exe = find_chromium()
    if exe:
        return exe
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                           capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
            r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                               capture_output=True, text=True, env=env, timeout=900)
        exe = find_chromium()
        if exe:
            return exe
        pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {r.stderr[-300:]}")
    pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")


class CDP:
    """Minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, ws_url: str):
        self.ws = ws_sync.connect(ws_url, max_size=None, open_timeout=10)
        self.n = 0

    def call(self, method: str, timeout: float = 30.0, **params):
        self.n += 1
        mid = self.n
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    def key(self, type_: str, key: str, code: str, vk: int):
        self.call("Input.dispatchKeyEvent", type=type_, key=key, code=code, windowsVirtualKeyCode=vk,
                  nativeVirtualKeyCode=vk)

    def close(self):
        self.ws.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=20.0, every=0.1):
    timeout *= 2                     # generous: the suite runs on a loaded 2-core machine
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    return None


@pytest.fixture(scope="module")
def chromium():
    return ensure_chromium()


@pytest.fixture(scope="module")
def server():
    pipe, notice = demo_mod.load_pipeline("tiny-world", random_weights=True)
    # the idle watchdog is the backstop when gradio's unload is slow to arrive on a loaded machine
    demo = demo_mod.build_demo(pipe, notice=notice, idle_timeout=20.0)
    port = free_port()
    demo_mod.launch(demo, "127.0.0.1", port)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def browser(chromium):
    profile = tempfile.mkdtemp(prefix="sg-chromium-")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        assert wait_for(lambda: os.path.exists(port_file) and open(port_file).read().strip(), 30), \
            "chromium did not start its DevTools endpoint"
        port = int(open(port_file).read().split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:   # chromium's helper processes too, before the profile is removed
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(devtools: str, url: str) -> tuple[CDP, str]:
    req = urllib.request.Request(f"{devtools}/json/new?{url}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        target = json.load(r)
    return CDP(target["webSocketDebuggerUrl"]), target["id"]


def test_browser_streams_keys_screenshot_and_close(server, browser):
    demo, url = server
    app = demo.streamgen_app
    page, target_id = open_page(browser, url + "?autostart=1")
    try:
        page.call("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
        # the page started a stream by itself and frames are arriving
        tab = wait_for(lambda: next((t for t in list(app.tabs.values())
                                     if t.stream is not None and t.stream.frames_shown >= 12), None), 60)
        assert tab is not None, "no frames streamed to the browser"
        assert wait_for(lambda: page.eval(
            "(() => { const i = document.querySelector('#sg-video img'); return !!(i && i.complete && i.naturalWidth >= 64); })()"), 20)
        for sel in ("#sg-start", "#sg-stop", "#sg-prompt", "#sg-switch", "#sg-seed", "#sg-download",
                    "#sg-key-W", "#sg-key-A", "#sg-key-S", "#sg-key-D", "#sg-turn-left", "#sg-turn-right",
                    "#sg-readout", "#sg-untrained"):
            assert page.eval(f"!!document.querySelector('{sel}')"), f"missing control {sel}"
        assert "RANDOM WEIGHTS" in page.eval("document.querySelector('#sg-untrained').innerText")

        # keyboard capture: W held -> the session's input and the next chunk's action
        stream = tab.stream
        page.call("Page.bringToFront")
        page.eval("document.activeElement && document.activeElement.blur()")
        page.key("keyDown", "w", "KeyW", 87)
        assert wait_for(lambda: tab.keys == ["W"], 10), f"keyboard not captured: {tab.keys}"
        assert wait_for(lambda: any(a["keys"] == ["W"] for _, a in stream.actions), 15)
        page.key("keyDown", "ArrowLeft", "ArrowLeft", 37)
        assert wait_for(lambda: tab.turn[0] < 0, 10)
        page.key("keyUp", "ArrowLeft", "ArrowLeft", 37)
        page.key("keyUp", "w", "KeyW", 87)
        assert wait_for(lambda: tab.keys == [] and tab.turn == [0.0, 0.0], 10)
        # typing in the prompt box is not captured as movement
        page.eval("document.querySelector('#sg-prompt textarea').focus()")
        page.key("keyDown", "w", "KeyW", 87)
        page.key("keyUp", "w", "KeyW", 87)
        time.sleep(0.3)
        assert tab.keys == []
        page.eval("document.activeElement.blur()")
        # drag on the video turns
        box = page.eval("(() => { const r = document.querySelector('#sg-video img').getBoundingClientRect();"
                        " return [r.x, r.y, r.width, r.height]; })()")
        x, y = box[0] + box[2] / 2, box[1] + box[3] / 2
        page.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        for i in range(1, 6):
            page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x + 12 * i, y=y, button="left")
        page.call("Input.dispatchMouseEvent", type="mouseReleased", x=x + 60, y=y, button="left", clickCount=1)
        assert wait_for(lambda: tab.drag_total[0] > 0.05, 10), f"drag not captured: {tab.drag_total}"
        assert wait_for(lambda: any(a["mouse"][0] > 0.05 for _, a in stream.actions), 15)

        # screenshot: the video region holds a real (non-blank) frame
        time.sleep(1.0)
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        out = os.environ.get("STREAMGEN_DEMO_SCREENSHOT")
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
            with open(out, "wb") as f:
                f.write(shot)
        img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.float32)
        box = page.eval("(() => { const r = document.querySelector('#sg-video img').getBoundingClientRect();"
                        " return [r.x, r.y, r.width, r.height]; })()")
        x0, y0, w, h = (int(round(v)) for v in box)
        assert w >= 256 and h >= 256, f"video shown too small: {w}x{h}"
        region = img[y0 + 4:y0 + h - 4, x0 + 4:x0 + w - 4]
        assert region.size and region.std() > 5, "the video region of the screenshot is blank"
        assert len(np.unique(region.reshape(-1, 3)[::7], axis=0)) > 20, "the video region is flat"

        # ground truth beside the model: the world renderer's own frames, not blank, not the model's
        assert page.eval("(() => { const i = document.querySelector('#sg-truth img');"
                         " return !!(i && i.complete && i.naturalWidth >= 64); })()"), "no ground-truth panel"
        tbox = page.eval("(() => { const r = document.querySelector('#sg-truth img').getBoundingClientRect();"
                         " return [r.x, r.y, r.width, r.height]; })()")
        tx, ty, tw, th = (int(round(v)) for v in tbox)
        truth = img[ty + 4:ty + th - 4, tx + 4:tx + tw - 4]
        assert tw >= 200 and truth.std() > 5 and tx >= x0 + w - 4, "the ground truth is not shown beside the model"
        assert stream.world is not None and stream.start_source == "world renderer"
        assert "world renderer" in page.eval("document.querySelector('#sg-start-note').innerText")

        # prompt switch: "queued" until the chunk applies it, then where it happened; gone after Stop
        page.eval("(() => { const t = document.querySelector('#sg-prompt textarea'); t.value = 'an ice cave at night';"
                  " t.dispatchEvent(new Event('input', {bubbles: true})); })()")
        time.sleep(0.5)
        page.eval("document.querySelector('#sg-switch').click()")
        status = "document.querySelector('#sg-status').innerText"
        assert wait_for(lambda: "switched at frame" in (page.eval(status) or ""), 60), page.eval(status)
        assert "queued" not in page.eval(status)
        page.eval("document.querySelector('#sg-stop').click()")
        readout = "document.querySelector('#sg-readout').innerText"
        assert wait_for(lambda: "status stopped" in (page.eval(readout) or ""), 60), page.eval(readout)
        time.sleep(1.0)
        assert "queued" not in page.eval(status)
        frames = int(page.eval(readout).split("frames so far")[1].split()[0])
        page.eval("document.querySelector('#sg-download').click()")
        label = "(() => { const e = document.querySelector('#sg-mp4'); return e ? e.innerText : ''; })()"
        assert wait_for(lambda: "MP4:" in (page.eval(label) or ""), 60), page.eval(label)
        assert f"MP4: {frames} frames, 256x256" in page.eval(label), (frames, page.eval(label))
        assert stream.recorded_frames() == frames
        # and it streams again
        page.eval("document.querySelector('#sg-start').click()")
        assert wait_for(lambda: tab.stream is not None and tab.stream is not stream
                        and tab.stream.frames_shown >= 3, 90), "Start after Stop did not stream"
        stream = tab.stream

        # closing the tab frees its session (gradio unload on heartbeat disconnect)
        sh = tab.session_hash
        with urllib.request.urlopen(f"{browser}/json/close/{target_id}", timeout=10):
            pass
        assert wait_for(lambda: sh not in app.tabs, 60), "closed tab's session was not freed"
        assert wait_for(stream.done.is_set, 30) and stream.session.cache is None
        assert app.active_streams() == 0
    finally:
        page.close()
