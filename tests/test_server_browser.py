"""The browser page in headless Chromium (Debian's `chromium`, driven over the DevTools protocol):
it connects, renders frames (screenshot not blank) and keys change the actions sent; arrow keys
turn (as in the demo), there is no pointer lock, Stop says "stopped" (no close-code error), and
in H.264 fMP4 mode a click on the video captures the keys."""
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import signal
import subprocess
import tempfile
import time

import httpx
import numpy as np
import pytest

from streamgen.engine.pipeline import Pipeline
from streamgen.server.app import create_app
from streamgen.server.cli import ServerThread


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
        exe = shutil.which("chromium")
    return exe


CHROME = _chromium()
pytestmark = pytest.mark.skipif(CHROME is None, reason="chromium is not installed and could not be installed "
                                "(needs root + apt-get: `apt-get install -y chromium`)")


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class CDP:
    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method, **params):
        self.n += 1
        my = self.n
        await self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            m = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if m.get("id") == my:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m["result"]

    async def js(self, expr):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    async def key(self, code, key, down=True, vk=None):
        await self.call("Input.dispatchKeyEvent", type="keyDown" if down else "keyUp", code=code, key=key,
                        windowsVirtualKeyCode=vk or ord(key.upper()))

    async def click(self, selector):
        """A real mouse click at the element's centre (what a user does)."""
        r = json.loads(await self.js(f"(() => {{ const e = document.querySelector('{selector}'); "
                                     "e.scrollIntoView({block: 'center'}); "
                                     "return JSON.stringify(e.getBoundingClientRect()); })()"))
        x, y = r["x"] + r["width"] / 2, r["y"] + r["height"] / 2
        for t in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=1)

    async def until(self, expr, timeout=60):
        t_end = time.time() + timeout
        while time.time() < t_end:
            v = await self.js(expr)
            if v:
                return v
            await asyncio.sleep(0.2)
        return await self.js(expr)


def test_browser_page_streams_and_sends_keys():
    from websockets.asyncio.client import connect
    pipe = Pipeline.from_pretrained("tiny-world", random_weights=True)
    app = create_app(pipe, max_sessions=2, pace=2.0)
    port = _free_port()
    with ServerThread(app) as srv, tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as prof:
        chrome = subprocess.Popen([CHROME, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                   "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                   "--disable-sync", f"--user-data-dir={prof}", f"--remote-debugging-port={port}",
                                   "--window-size=1000,1000", "about:blank"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            t0 = time.time()
            while True:
                try:
                    targets = httpx.get(f"http://127.0.0.1:{port}/json").json()
                    page = [t for t in targets if t["type"] == "page"][0]
                    break
                except Exception:
                    assert time.time() - t0 < 60 and chrome.poll() is None, "chromium did not start"
                    time.sleep(0.2)

            async def go():
                async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                    cdp = CDP(ws)
                    await cdp.call("Page.enable")
                    await cdp.call("Page.navigate", url=srv.url + "/?autostart=1")
                    await cdp.until("window.sg && sg.framesDrawn >= 6", 90)
                    assert await cdp.js("sg.framesDrawn") >= 6, await cdp.js("JSON.stringify(sg && sg.errors)")
                    await cdp.click("#screen")                       # a click on the picture focuses it
                    await cdp.key("KeyW", "w")
                    await asyncio.sleep(0.3)
                    await cdp.key("KeyD", "d")
                    await asyncio.sleep(0.3)
                    sent = await cdp.js("JSON.stringify(sg.sentLog)")
                    await cdp.key("KeyW", "w", down=False)
                    t_end = time.time() + 30
                    while time.time() < t_end:
                        last = json.loads(await cdp.js("JSON.stringify(sg.sentLog)"))[-1]
                        if await cdp.js("sg.lastFrameSeq") >= last["seq"]:
                            break
                        await asyncio.sleep(0.1)
                    reflected = await cdp.js("sg.lastFrameSeq")
                    colours = await cdp.js("(() => { const c = document.getElementById('screen'); "
                                           "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
                                           "const s = new Set(); for (let i = 0; i < d.length; i += 4) "
                                           "s.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]); return s.size; })()")
                    r = await cdp.js("JSON.stringify(document.getElementById('screen').getBoundingClientRect())")
                    r = json.loads(r)
                    shot = await cdp.call("Page.captureScreenshot", format="png",
                                          clip={"x": r["x"], "y": r["y"], "width": r["width"], "height": r["height"],
                                                "scale": 1})
                    more = await page_checks(cdp)
                    return json.loads(sent), last, reflected, shot["data"], colours, more
            sent, last, reflected, png, colours, more = asyncio.run(go())
        finally:   # chromium's helper processes too, before the profile is removed
            try:
                os.killpg(chrome.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            chrome.wait()
    keysets = [tuple(a["keys"]) for a in sent]
    assert ("W",) in keysets and ("W", "D") in keysets, keysets
    assert last["keys"] == ["D"]
    assert reflected >= last["seq"], "the server applied the page's latest action"
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))
    assert colours > 4, "canvas holds no rendered frame"
    # screenshot of just the canvas: a rendered frame, not a flat colour
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 4 and img.std() > 5, "screenshot is blank"
    turn = more["turn"]
    assert turn["keys"] == [] and turn["mouse"][0] < 0, f"ArrowLeft must turn left, not strafe: {turn}"
    assert more["pointer_lock"] is False
    assert more["stopped"].startswith("stopped") and more["err_after_stop"] == "", more
    assert "1005" not in more["err_after_stop"] and more["state"] == "stopped"
    assert "device" in more["stats"] and "cpu" in more["stats"], more["stats"]
    if more["fmp4"] is None:
        pytest.skip("this chromium has no MSE H.264: the fMP4 key check did not run (the rest passed)")
    fm = more["fmp4"]
    assert fm["frames"] >= 3, fm
    assert ["W"] in [a["keys"] for a in fm["sent"]], f"keys do nothing in fMP4 mode: {fm}"
    assert fm["reflected"] >= fm["seq_w"], "the server applied the W pressed over the video"


async def page_checks(cdp):
    """Arrow keys turn; no pointer lock; Stop says stopped; fMP4 mode takes keys after a click on the video."""
    out = {}
    await cdp.key("KeyD", "d", down=False)
    await cdp.click("#screen")
    await cdp.key("ArrowLeft", "ArrowLeft", vk=37)
    await asyncio.sleep(0.4)
    out["turn"] = json.loads(await cdp.js("JSON.stringify(sg.sentLog[sg.sentLog.length - 1])"))
    await cdp.key("ArrowLeft", "ArrowLeft", down=False, vk=37)
    out["pointer_lock"] = await cdp.js("document.pointerLockElement !== null")
    out["stats"] = await cdp.js("document.getElementById('stats').textContent")
    await cdp.click("#stop")                                     # the first Stop works, focus on the picture or not
    out["stopped"] = await cdp.until("document.getElementById('status').textContent", 10)
    await asyncio.sleep(1.5)                                     # the close event has arrived
    out["err_after_stop"] = await cdp.js("document.getElementById('err').textContent")
    out["state"] = await cdp.js("sg.state")
    if not await cdp.js("!!(window.MediaSource && MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.42E01E\"'))"):
        out["fmp4"] = None
        return out
    await cdp.js("(() => { const c = document.getElementById('codec'); c.value = 'fmp4';"
                 " c.dispatchEvent(new Event('change')); })()")
    await cdp.click("#start")
    await cdp.until("sg.state === 'streaming' && sg.framesDrawn >= 3", 90)
    await cdp.js("document.activeElement && document.activeElement.blur()")
    await cdp.click("#video")                                    # click the video the user sees
    await cdp.key("KeyW", "w")
    await asyncio.sleep(0.4)
    seq_w = await cdp.js("(() => { const l = sg.sentLog.filter(a => a.keys.includes('W')); "
                         "return l.length ? l[l.length - 1].seq : -1; })()")
    await cdp.until(f"sg.lastFrameSeq >= {seq_w}", 30)
    await cdp.key("KeyW", "w", down=False)
    out["fmp4"] = {"frames": await cdp.js("sg.framesDrawn"), "seq_w": seq_w,
                   "reflected": await cdp.js("sg.lastFrameSeq"),
                   "sent": json.loads(await cdp.js("JSON.stringify(sg.sentLog)"))}
    return out
