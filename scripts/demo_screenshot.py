"""python scripts/demo_screenshot.py [--model default] [--out docs/demo.png] [--seconds 6] [--start world|noise] [--no-truth]

Takes the README's demo screenshot. It starts the Gradio demo in this process, opens it in
headless Chromium (Debian's `chromium`) through the DevTools protocol, lets the page start a stream
(by default from the world renderer's opening frames, with the ground-truth panel beside the
model), holds W (and later turns right) for a few seconds, and saves a PNG of the page.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """The smallest DevTools client that can drive one page."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect
        self.ws, self.n = connect(ws_url, max_size=None, open_timeout=10), 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

    def key(self, kind: str, key: str, code: str, vk: int):
        self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=vk,
                  nativeVirtualKeyCode=vk)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="docs/demo.png")
    p.add_argument("--seconds", type=float, default=6.0, help="how long to walk before the screenshot")
    p.add_argument("--prompt", default="a brick dungeon at dusk, light haze")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", default="world", choices=["world", "noise"], help="opening frames")
    p.add_argument("--no-truth", action="store_true", help="hide the ground-truth panel")
    p.add_argument("--width", type=int, default=1280, help="browser window width")
    p.add_argument("--height", type=int, default=1100, help="browser window height")
    a = p.parse_args(argv)
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if chrome is None:
        print("error: needs chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    from streamgen.server import demo as demo_mod
    pipe, notice = demo_mod.load_pipeline(a.model, random_weights=a.model != "default")
    demo = demo_mod.build_demo(pipe, notice=notice, default_prompt=a.prompt)
    port = _free_port()
    demo_mod.launch(demo, "127.0.0.1", port)
    profile = tempfile.mkdtemp(prefix="sg-shot-")
    proc = subprocess.Popen([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={a.width},{a.height}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        t0 = time.monotonic()
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.monotonic() - t0 > 30:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        dev = f"http://127.0.0.1:{int(open(port_file).read().split()[0])}"
        req = urllib.request.Request(f"{dev}/json/new?http://127.0.0.1:{port}/", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            page = Page(json.load(r)["webSocketDebuggerUrl"])
        page.call("Emulation.setDeviceMetricsOverride", width=a.width, height=a.height, deviceScaleFactor=1, mobile=False)
        app = demo.streamgen_app
        t0 = time.monotonic()
        while not page.eval("!!document.querySelector('#sg-start')"):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the demo page did not load")
            time.sleep(0.2)
        page.eval(f"""(() => {{
            const set = (sel, v) => {{ const e = document.querySelector(sel); if (!e) return;
                e.value = v; e.dispatchEvent(new Event('input', {{bubbles: true}})); }};
            set('#sg-seed input', '{a.seed}');
            const r = document.querySelector('#sg-start-from input[value="{a.start}"]'); if (r) r.click();
            const t = document.querySelector('#sg-truth-on input');
            if (t && t.checked === {'true' if a.no_truth else 'false'}) t.click();
        }})()""")
        time.sleep(0.5)
        page.eval("document.querySelector('#sg-start').click()")
        while not any(t.stream is not None and t.stream.frames_shown > 6 for t in list(app.tabs.values())):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("no frames reached the page")
            time.sleep(0.2)
        page.eval("document.activeElement && document.activeElement.blur()")
        page.key("keyDown", "w", "KeyW", 87)
        time.sleep(a.seconds / 2)
        page.key("keyDown", "ArrowRight", "ArrowRight", 39)
        time.sleep(a.seconds / 4)
        page.key("keyUp", "ArrowRight", "ArrowRight", 39)
        time.sleep(a.seconds / 4)
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        page.key("keyUp", "w", "KeyW", 87)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "wb") as f:
            f.write(shot)
        print(json.dumps({"out": a.out, "bytes": len(shot), "model": a.model, "trained": pipe.trained,
                          "start": a.start, "truth": not a.no_truth, "seed": a.seed, "prompt": a.prompt}))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
        demo.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
