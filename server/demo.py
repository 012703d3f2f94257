"""streamgen demo [--model default] [--port 7860] [--host 127.0.0.1] [--device cpu] [--random-weights]

The interactive Gradio demo: type a prompt, press Start, and the video appears frame by frame
as the engine generates it chunk by chunk. The prompt can be switched mid-stream (the engine's
prompt-switch policy; the stream does not restart). Models with an action space get W/A/S/D
and turn buttons, keyboard capture (W/A/S/D move, arrow keys turn/look, drag on the video to
turn) and every input is applied at the next chunk. A live readout shows generated fps, chunk
latency, frames so far, device and attention backend; "Download MP4" writes what was generated.

    streamgen demo                                        # the shipped default model
    streamgen demo --model tiny-world --random-weights    # untrained, for plumbing/speed
    python -m streamgen.server.demo --port 7861

Design (see ``build_demo``):

* **Display component**: a plain ``gr.Image`` output updated by a generator event handler that
  yields one numpy frame per video frame (PNG, nearest-neighbour upscaled so 64x64 frames are
  visible). Every yield reaches the browser at once (~one PNG file per frame, a few ms), so
  the first frame shows up one chunk after Start. ``gr.Video(streaming=True)`` was rejected:
  it needs ffmpeg/ffprobe and plays HLS segments, which adds at least a segment (~1 s+) of
  latency and buffers before playing; the image path needs neither and is frame-accurate.
* **Per tab**: a ``gr.State`` holds a :class:`TabState` (inputs, prompt, the running
  :class:`Stream`). Each stream owns an engine ``Session`` and a worker thread that generates
  chunks ahead into a small bounded queue, while the event generator drains it paced to the
  model's fps (or to the generation rate when that is slower), so playback looks like video.
  The worker reads the tab's latest keys / turn / drag / pending prompt at every chunk boundary.
* **Freeing**: a closed tab fires ``demo.unload`` (gradio's heartbeat disconnect), which stops
  the tab's stream and frees its session; the state's ``delete_callback`` and an idle watchdog
  (no frames pulled for ``idle_timeout`` s) are the backstops.
"""
import argparse
import json
import os
import queue
import sys
import tempfile
import threading
import time

import numpy as np

DEFAULT_PROMPT = "a stone dungeon corridor lit by torches"
TURN_RATE = 0.5          # mouse dx/dy per chunk while an arrow key / turn button is held

KEY_BUTTONS = ("W", "A", "S", "D")

from .demo_session import Stream, TabState  # noqa: E402  (Stream, TabState: re-exported)


# --------------------------------------------------------------------------- app
class DemoApp:
    """Holds the pipeline and the live tabs; ``build`` makes the gr.Blocks."""

    def __init__(self, pipe, *, display_size: int = 384, idle_timeout: float = 60.0,
                 max_sessions: int = 8, max_record_mb: float = 512.0, notice: str | None = None,
                 default_prompt: str = DEFAULT_PROMPT):
        self.pipe = pipe
        self.info = pipe.describe()
        self.pipe_lock = threading.Lock()       # one chunk at a time on the shared model
        self.display_size = int(display_size)
        self.idle_timeout = float(idle_timeout)
        self.max_sessions = int(max_sessions)
        self.max_record_bytes = int(max_record_mb * 2**20)
        self.notice = notice
        self.default_prompt = default_prompt
        space = self.info["action_space"]
        self.has_actions = bool(space["keys"]) or bool(space["mouse"])
        self.tabs: dict[str, TabState] = {}
        self.tabs_lock = threading.Lock()
        self.tmpdir = tempfile.mkdtemp(prefix="streamgen-demo-")

    # helpers -----------------------------------------------------------------
    def active_streams(self) -> int:
        with self.tabs_lock:
            return sum(1 for t in self.tabs.values() if t.stream is not None and t.stream.running)

    def _tab(self, tab: TabState | None, request) -> TabState:
        if tab is None:
            tab = TabState()
        tab.space = self.info["action_space"]
        sh = getattr(request, "session_hash", None) if request is not None else None
        if sh:
            tab.session_hash = sh
            with self.tabs_lock:
                self.tabs[sh] = tab
        return tab

    def upscale(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        k = max(1, self.display_size // max(h, w))
        if k > 1:
            frame = np.repeat(np.repeat(frame, k, axis=0), k, axis=1)
        return frame

    def readout(self, tab: TabState, status: str | None = None) -> str:
        d = self.info
        s = tab.stream or tab.last_stream
        st = s.stats() if s is not None else None
        state = status or ("streaming" if st and st["running"] else "stopped" if st else "idle")
        lines = [f"**status** {state}"]
        if st:
            ffl = "-" if st["first_frame_s"] is None else f"{st['first_frame_s']:.2f} s"
            lines += [
                f"**generated fps** {st['generated_fps']:.1f} ({st['realtime_x']:.2f}x real time at {d['fps']} fps)"
                f" · **shown fps** {st['shown_fps']:.1f}",
                f"**chunk latency** {st['chunk_latency_ms']:.0f} ms (avg {st['chunk_latency_avg_ms']:.0f} ms,"
                f" {d['chunk_frames']} frames/chunk) · **first frame** {ffl}",
                f"**frames so far** {st['frames_generated']} ({st['chunks']} chunks, {st['frames_shown']} shown)",
                f"**seed** {st['seed']} · **prompt switches** {st['switches']}",
            ]
            if self.has_actions and st["last_action"] is not None:
                a = st["last_action"]
                lines.append(f"**last action** keys {'+'.join(a['keys']) or '-'}, "
                             f"mouse ({a['mouse'][0]:+.2f}, {a['mouse'][1]:+.2f})")
            if st["error"]:
                lines.append(f"**error** {st['error']}")
        lines.append(f"**device** {d['device']} · **dtype** {d['dtype']} · **attention** {d['attn_backend']}"
                     + ("" if d["trained"] else " · **RANDOM WEIGHTS**"))
        return "  \n".join(lines)

    # event handlers ----------------------------------------------------------
    def start(self, prompt, seed, tab, request=None):
        """Generator: start a fresh stream for this tab and yield its frames paced to video rate."""
        import gradio as gr
        tab = self._tab(tab, request)
        prompt = (prompt or "").strip() or self.default_prompt
        try:
            seed = int(seed) if seed is not None and str(seed).strip() != "" else 0
        except (TypeError, ValueError):
            raise gr.Error(f"seed must be an integer, got {seed!r}") from None
        if tab.stream is not None:
            tab.close()
        if self.active_streams() >= self.max_sessions:
            raise gr.Error(f"the demo is at its limit of {self.max_sessions} concurrent streams; try again later")
        with tab._lock:
            tab.pending_prompt = None
            tab.pulses = []
        try:
            stream = Stream(self, tab, prompt, seed)
        except Exception as e:       # bad prompt etc.
            raise gr.Error(str(e)) from None
        tab.stream = tab.last_stream = stream
        yield gr.skip(), self.readout(tab, "starting"), tab
        next_t = None
        last_readout = 0.0
        try:
            while tab.stream is stream and not stream.stop_evt.is_set():
                try:
                    frame, boundary = stream.q.get(timeout=0.1)
                except queue.Empty:
                    stream.last_pull = time.monotonic()
                    if stream.done.is_set():
                        break
                    next_t = None      # under-run: restart the clock, don't burst to catch up
                    continue
                now = time.monotonic()
                if next_t is not None and now < next_t:
                    time.sleep(next_t - now)
                    now = time.monotonic()
                next_t = (now if next_t is None else max(next_t, now - stream.frame_period())) + stream.frame_period()
                stream.last_pull = now
                with stream.lock:
                    stream.frames_shown += 1
                    stream.shown_times.append(now)
                    if stream.first_frame_s is None:
                        stream.first_frame_s = time.perf_counter() - stream.t_start
                if boundary or now - last_readout > 0.5:
                    last_readout = now
                    yield self.upscale(frame), self.readout(tab), gr.skip()
                else:
                    yield self.upscale(frame), gr.skip(), gr.skip()
        finally:
            stream.stop()
            if tab.stream is stream:
                tab.stream = None
        if stream.error is not None:
            raise gr.Error(f"generation failed: {stream.stats()['error']}")
        yield gr.skip(), self.readout(tab, "stopped"), gr.skip()

    def stop(self, tab, request=None):
        tab = self._tab(tab, request)
        tab.close()
        return self.readout(tab, "stopped")

    def switch_prompt(self, prompt, tab, request=None):
        import gradio as gr
        from streamgen.text import check_prompt
        tab = self._tab(tab, request)
        try:
            prompt = check_prompt((prompt or "").strip() or self.default_prompt, self.pipe.config.max_prompt_chars)
        except Exception as e:
            raise gr.Error(str(e)) from None
        if tab.stream is not None and tab.stream.running:
            tab.switch_prompt(prompt)
            return f"prompt switch queued for the next chunk: {prompt!r}"
        return f"prompt set for the next Start: {prompt!r}"

    def set_input(self, payload, tab, request=None):
        """Keyboard / drag state from the page: JSON {"keys": [...], "turn": [x, y], "drag": [x, y]}."""
        tab = self._tab(tab, request)
        try:
            data = json.loads(payload) if isinstance(payload, str) and payload.strip() else {}
        except json.JSONDecodeError:
            return
        if isinstance(data, dict):
            try:
                tab.set_input(data)
            except (TypeError, ValueError):
                pass

    def press(self, name, tab, request=None):
        """An on-screen button click: that action is applied to the next chunk."""
        tab = self._tab(tab, request)
        if name in KEY_BUTTONS:
            tab.pulse({"keys": [name]})
        elif name == "left":
            tab.pulse({"mouse": [-TURN_RATE, 0.0]})
        elif name == "right":
            tab.pulse({"mouse": [TURN_RATE, 0.0]})

    def download(self, tab, request=None):
        import gradio as gr
        from streamgen.video import write_mp4
        tab = self._tab(tab, request)
        s = tab.stream or tab.last_stream
        if s is None:
            raise gr.Error("nothing generated yet: press Start first")
        with s.lock:
            blocks = list(s.recorded)
            n_gen = s.frames_generated
        if not blocks:
            raise gr.Error("nothing generated yet: wait for the first chunk")
        for old in os.listdir(self.tmpdir):          # gradio serves its own copy; drop stale ones
            fp = os.path.join(self.tmpdir, old)
            try:
                if time.time() - os.path.getmtime(fp) > 600:
                    os.remove(fp)
            except OSError:
                pass
        path = os.path.join(self.tmpdir, f"streamgen-seed{s.seed}-{n_gen}f-{int(time.time() * 1000)}.mp4")
        write_mp4(path, blocks, fps=int(self.info["fps"]))
        return path

    def unload(self, request=None):
        sh = getattr(request, "session_hash", None)
        if not sh:
            return
        with self.tabs_lock:
            tab = self.tabs.pop(sh, None)
        if tab is not None:
            tab.close()

    def forget_tab(self, session_hash: str | None, stream: "Stream"):
        """Drop a tab whose stream was released by the idle watchdog (its page went away)."""
        if not session_hash:
            return
        with self.tabs_lock:
            tab = self.tabs.get(session_hash)
            if tab is not None and tab.stream in (stream, None):
                del self.tabs[session_hash]

    def on_state_deleted(self, tab):
        if isinstance(tab, TabState):
            tab.close()
            if tab.session_hash:
                with self.tabs_lock:
                    if self.tabs.get(tab.session_hash) is tab:
                        del self.tabs[tab.session_hash]

    # UI ------------------------------------------------------------------------
    def build(self, title: str = "streamgen live demo"):
        import gradio as gr
        d = self.info
        space = d["action_space"]
        app = self

        def start(prompt, seed, tab, request: gr.Request):
            yield from app.start(prompt, seed, tab, request)

        def stop(tab, request: gr.Request):
            return app.stop(tab, request)

        def switch(prompt, tab, request: gr.Request):
            return app.switch_prompt(prompt, tab, request)

        def set_input(payload, tab, request: gr.Request):
            app.set_input(payload, tab, request)

        def download(tab, request: gr.Request):
            return gr.File(value=app.download(tab, request), visible=True)

        def unload(request: gr.Request):
            app.unload(request)

        def new_seed():
            return int(np.random.randint(0, 2**31 - 1))

        model_line = (f"model **{d['source']}** · {d['width']}×{d['height']} @ {d['fps']} fps · "
                      f"{d['chunk_frames']} frames/chunk · {d['steps']} steps · device **{d['device']}** · "
                      f"{d['dtype']} · attention **{d['attn_backend']}**")
        with gr.Blocks(title=title, delete_cache=(60, 120)) as demo:
            tab = gr.State(TabState(), delete_callback=self.on_state_deleted)
            gr.Markdown(f"## streamgen — real-time streaming video\n{model_line}", elem_id="sg-title")
            if not d["trained"]:
                msg = self.notice or "this model has random, untrained weights"
                gr.HTML(f'<div id="sg-untrained">⚠ RANDOM WEIGHTS / untrained — {msg}. The frames only '
                        'exercise the engine (speed, plumbing); they are not a trained model\'s video.</div>')
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=360):
                    video = gr.Image(label="live video", type="numpy", format="png", interactive=False,
                                     elem_id="sg-video", height=self.display_size + 40,
                                     buttons=["fullscreen"], placeholder="press Start")
                    if self.has_actions:
                        gr.Markdown("**Controls** — hold **W/A/S/D** to move, **←/→** to turn (**↑/↓** look), "
                                    "or **drag on the video** to turn; or hold the buttons below. "
                                    "Inputs apply at the next chunk.", elem_id="sg-help")
                        with gr.Row(elem_id="sg-pad"):
                            btn_left = gr.Button("⟲ turn left", elem_id="sg-turn-left", size="sm")
                            key_btns = {}
                            for k in KEY_BUTTONS:
                                if k in space["keys"]:
                                    key_btns[k] = gr.Button(k, elem_id=f"sg-key-{k}", size="sm")
                            btn_right = gr.Button("turn right ⟳", elem_id="sg-turn-right", size="sm")
                with gr.Column(scale=2, min_width=300):
                    prompt = gr.Textbox(value=self.default_prompt, label="prompt", lines=2, max_lines=4,
                                        elem_id="sg-prompt")
                    with gr.Row():
                        switch_btn = gr.Button("Switch prompt (no restart)", elem_id="sg-switch", size="sm")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="seed", elem_id="sg-seed", minimum=0)
                        dice = gr.Button("random seed", size="sm", elem_id="sg-dice")
                    with gr.Row():
                        start_btn = gr.Button("▶ Start", variant="primary", elem_id="sg-start")
                        stop_btn = gr.Button("■ Stop", variant="stop", elem_id="sg-stop")
                    status = gr.Markdown("", elem_id="sg-status")
                    readout = gr.Markdown(self.readout(TabState()), elem_id="sg-readout")
                    dl_btn = gr.Button("⬇ Download MP4 (frames so far)", elem_id="sg-download", size="sm")
                    mp4 = gr.File(label="MP4 of the frames so far", elem_id="sg-mp4", interactive=False, visible=False)
            # Page -> server input channel: the page JS stores its input state in window.__sgInput
            # and clicks this hidden button; the event's js returns that state as the payload.
            action_box = gr.Textbox(visible="hidden", elem_id="sg-input", label="input")
            send_btn = gr.Button("send input", visible="hidden", elem_id="sg-send")

            start_btn.click(start, [prompt, seed, tab], [video, readout, tab], api_name="start",
                            concurrency_limit=self.max_sessions, concurrency_id="sg-stream",
                            show_progress="hidden")
            stop_btn.click(stop, [tab], [readout], api_name="stop", concurrency_limit=None,
                           show_progress="hidden")
            switch_btn.click(switch, [prompt, tab], [status], api_name="switch_prompt",
                             concurrency_limit=None, show_progress="hidden")
            prompt.submit(switch, [prompt, tab], [status], api_visibility="private",
                          concurrency_limit=None, show_progress="hidden")
            dice.click(new_seed, None, [seed], api_visibility="private", queue=False)
            dl_btn.click(download, [tab], [mp4], api_name="download_mp4", concurrency_limit=None)
            send_btn.click(set_input, [action_box, tab], None, api_name="set_input",
                           js="(p, t) => [window.__sgInput || p || '', t]",
                           concurrency_limit=None, trigger_mode="always_last", show_progress="hidden")
            if self.has_actions:
                def make_press(name):
                    def press(tab, request: gr.Request):
                        app.press(name, tab, request)
                    return press

                for name, b in [*key_btns.items(), ("left", btn_left), ("right", btn_right)]:
                    b.click(make_press(name), [tab], None, api_name=f"press_{name}", concurrency_limit=None,
                            show_progress="hidden")
            demo.load(None, None, None, js=_page_js(self.has_actions))
            demo.unload(unload)
        demo.streamgen_app = self        # for tests and introspection
        return demo


# --------------------------------------------------------------------------- page JS/CSS
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _page_js(actions: bool) -> str:
    """server/static/demo.js with the page CSS, whether to capture actions and the turn rate."""
    with open(os.path.join(_STATIC, "demo.js"), encoding="utf-8") as f:
        js = f.read()
    with open(os.path.join(_STATIC, "demo.css"), encoding="utf-8") as f:
        css = f.read()
    return (js.replace("__SG_CSS__", json.dumps(css)).replace("__SG_ACTIONS__", "true" if actions else "false")
            .replace("__SG_TURN__", repr(TURN_RATE)))


# --------------------------------------------------------------------------- entry points
def load_pipeline(model: str = "default", *, device: str = "cpu", attn_backend: str = "sdpa",
                  random_weights: bool = False, dtype: str = "float32", steps: int | None = None,
                  config: str | None = None, fallback: bool = True):
    """Load a pipeline; returns (pipe, notice). ``default`` falls back to untrained tiny-world
    (with a loud notice) when the shipped model is not installed yet."""
    from streamgen.pipeline import SHIPPED, Pipeline
    notice = None
    if (fallback and model == "default" and
            not os.path.exists(os.path.join(SHIPPED["default"], "config.json"))):
        notice = ("the shipped model 'default' is not installed (expected in "
                  f"{SHIPPED['default']}); falling back to 'tiny-world' with random weights")
        model, random_weights = "tiny-world", True
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, attn_backend=attn_backend,
                                    random_weights=random_weights, steps=steps, config=config)
    if notice is None and not pipe.trained:
        notice = f"'{model}' was loaded with --random-weights"
    return pipe, notice


def build_demo(pipe_or_model_name, *, device: str = "cpu", attn_backend: str = "sdpa",
               random_weights: bool = False, display_size: int = 384, idle_timeout: float = 60.0,
               max_sessions: int = 8, max_record_mb: float = 512.0, notice: str | None = None,
               default_prompt: str = DEFAULT_PROMPT):
    """The demo as a ``gr.Blocks`` for a loaded ``Pipeline`` or a model name/path.

    Launch it with ``demo.queue().launch(server_name="127.0.0.1")``; the page JS/CSS are
    installed by the page itself, so no launch arguments are needed.
    """
    if isinstance(pipe_or_model_name, str):
        pipe, auto_notice = load_pipeline(pipe_or_model_name, device=device, attn_backend=attn_backend,
                                          random_weights=random_weights)
        notice = notice or auto_notice
    else:
        pipe = pipe_or_model_name
    app = DemoApp(pipe, display_size=display_size, idle_timeout=idle_timeout, max_sessions=max_sessions,
                  max_record_mb=max_record_mb, notice=notice, default_prompt=default_prompt)
    return app.build()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="streamgen demo", description="Interactive Gradio demo (live streaming).")
    ap.add_argument("--model", default="default",
                    help="shipped model name, preset (with --random-weights) or checkpoint path (default: default)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attn-backend", default="sdpa", help="sdpa | triton | flex | xformers | flash | math")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: model's)")
    ap.add_argument("--config", default=None, help="pipeline preset for checkpoints that carry no config")
    ap.add_argument("--random-weights", action="store_true", help="random init (untrained; plumbing/speed only)")
    ap.add_argument("--display-size", type=int, default=384, help="upscale small frames to about this many px")
    ap.add_argument("--max-sessions", type=int, default=8, help="concurrent streams (browser tabs)")
    ap.add_argument("--idle-timeout", type=float, default=60.0,
                    help="free a stream whose tab stopped pulling frames for this long (s)")
    ap.add_argument("--no-fallback", action="store_true",
                    help="fail instead of falling back to untrained tiny-world when 'default' is missing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # a local demo phones nobody
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the demo needs gradio: pip install 'streamgen[demo]'", file=sys.stderr)
        return 2
    pipe, notice = load_pipeline(args.model, device=args.device, attn_backend=args.attn_backend,
                                 random_weights=args.random_weights, dtype=args.dtype, steps=args.steps,
                                 config=args.config, fallback=not args.no_fallback)
    if not pipe.trained:
        bar = "!" * 78
        print(f"{bar}\n!! RANDOM WEIGHTS / untrained: {notice}.\n!! The demo shows noise-like frames; "
              f"it only exercises the engine.\n{bar}", file=sys.stderr)
    app = DemoApp(pipe, display_size=args.display_size, idle_timeout=args.idle_timeout,
                  max_sessions=args.max_sessions, notice=notice)
    demo = app.build()
    d = app.info
    print(f"streamgen demo: {d['source']} on {d['device']} ({d['dtype']}, attention {d['attn_backend']}) "
          f"-> http://{args.host}:{args.port}", file=sys.stderr)
    demo.queue(max_size=64).launch(server_name=args.host, server_port=args.port, show_error=True,
                                   footer_links=["api"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
