"""streamgen demo [--model default] [--port 7860] [--host 127.0.0.1] [--device cpu] [--random-weights]

The interactive Gradio demo: pick a look or type a prompt, press Start, and frames appear as the
engine makes them; prompt switches and W/A/S/D, arrows, drag or the pad act at the next chunk.
World models open from the world renderer's frames (or noise) and show the world itself beside
the model under the same look, seed and actions; a readout shows fps, latency and backend.

    streamgen demo                                        # the shipped default model
    streamgen demo --model tiny-world --random-weights    # untrained, for plumbing/speed
Design (see ``DemoApp.build``):

* **Start-up**: ``main`` serves the page first and loads the model behind it (Start waits).
* **Display**: a ``gr.Image`` fed by a generator event handler, one upscaled PNG per frame (no
  ffmpeg, frame-accurate; ``gr.Video(streaming=True)`` needs ffmpeg and adds an HLS segment).
* **Per tab**: a ``gr.State`` holds a :class:`TabState` (inputs, the running :class:`Stream`,
  which gets its settings and callbacks as a :class:`StreamSettings`). A stream's worker thread generates chunks ahead into a small queue, reading the tab's inputs at
  every chunk boundary; the event generator drains it paced to the model's fps.
* **Freeing** (a :class:`TabRegistry`): a closed tab fires ``demo.unload``, and gradio closes the
  stream's event generator when its client disconnects, each of which frees the session; an
  unloaded session is never registered again by its page's events still in flight. The state's
  ``delete_callback`` and an idle watchdog (no frames pulled for ``idle_timeout`` s) are backstops.
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

from streamgen.cli import DEFAULT_PROMPT
from streamgen.cli_args import OneLineParser, add_model_args

from .demo_session import (DOWNLOADS, Stream, StreamSettings, TabRegistry, TabState,  # noqa: F401
                           describe_config, look_prompt, upscale_factor)

TURN_RATE = 0.5          # mouse dx/dy per chunk while an arrow key / turn button is held
KEY_BUTTONS = ("W", "A", "S", "D")
START_CHOICES = [("world renderer (the model continues from it)", "world"), ("noise", "noise")]


def _log(msg: str):
    print(f"streamgen demo: {msg}", file=sys.stderr, flush=True)


def user_error(msg: str):
    """A toast in the page and one line in the terminal (no traceback)."""
    import gradio as gr
    _log(f"error shown in the page: {msg}")
    return gr.Error(msg, print_exception=False)


# --------------------------------------------------------------------------- app
class DemoApp:
    """Holds the pipeline (or waits for it) and the live tabs; ``build`` makes the gr.Blocks."""

    def __init__(self, pipe=None, *, info: dict | None = None, display_size: int = 384,
                 idle_timeout: float = 60.0, max_sessions: int = 8, max_record_mb: float = 512.0,
                 notice: str | None = None, default_prompt: str = DEFAULT_PROMPT, card: str | None = None):
        if pipe is None and info is None:
            raise ValueError("DemoApp needs a pipeline or the info of the one being loaded")
        self.pipe = pipe
        self.info = pipe.describe() if pipe is not None else dict(info)
        self.ready = threading.Event()
        self.load_error: str | None = None
        if pipe is not None:
            self.ready.set()
        self.pipe_lock = threading.Lock()       # one chunk at a time on the shared model
        self.display_size = int(display_size)
        self.idle_timeout = float(idle_timeout)
        self.max_sessions = int(max_sessions)
        self.max_record_bytes = int(max_record_mb * 2**20)
        self.notice, self.card, self.default_prompt = notice, card, default_prompt
        d, space = self.info, self.info["action_space"]
        self.has_actions = bool(space["keys"]) or bool(space["mouse"])
        # the built-in world can render this model's ground truth (square world-sized frames)
        self.world_model = self.has_actions and d["height"] == d["width"] and set(space["keys"]) <= set(KEY_BUTTONS)
        self.registry = TabRegistry()
        self.tabs, self.tabs_lock = self.registry.tabs, self.registry.lock     # session hash -> TabState
        self.tmpdir = tempfile.mkdtemp(prefix="streamgen-demo-")

    def set_pipeline(self, pipe, notice: str | None = None):
        self.pipe = pipe
        self.info = pipe.describe()
        self.notice = self.notice or notice
        self.ready.set()

    def set_load_error(self, msg: str):
        self.load_error = msg
        self.ready.set()

    # helpers -----------------------------------------------------------------
    def active_streams(self) -> int:
        with self.tabs_lock:
            return sum(1 for t in self.tabs.values() if t.stream is not None and t.stream.running)

    def _tab(self, tab: TabState | None, request) -> TabState:
        """The event's tab state, bound to its session; only ``start`` registers it (``attach``)."""
        if tab is None:
            tab = TabState()
        tab.space = self.info["action_space"]
        sh = getattr(request, "session_hash", None) if request is not None else None
        if sh:
            tab.session_hash = sh
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
        state = status or ("streaming" if st and st["running"] else "stopped" if st else
                           "idle" if self.ready.is_set() else "loading the model…")
        lines = [f"**status** {state}"]
        if st:
            ffl = "-" if st["first_frame_s"] is None else f"{st['first_frame_s']:.2f} s"
            n_open = st["opening_frames"]
            opening = (f"{n_open} opening frames from the {st['start_source']} + " if n_open else "")
            lines += [
                f"**generated fps** {st['generated_fps']:.1f} ({st['realtime_x']:.2f}x real time at {d['fps']} fps)"
                f" · **shown fps** {st['shown_fps']:.1f}",
                f"**chunk latency** {st['chunk_latency_ms']:.0f} ms (avg {st['chunk_latency_avg_ms']:.0f} ms,"
                f" {d['chunk_frames']} frames/chunk) · **first frame** {ffl}",
                f"**frames so far** {st['frames']} ({opening}{st['frames_generated']} generated in "
                f"{st['chunks']} chunks; {st['frames_shown']} shown)",
                f"**seed** {st['seed']} · **start** {st['start_source']} · **prompt switches** {st['switches']}",
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

    def switch_status(self, tab: TabState, stream: Stream | None) -> str:
        """The prompt line: queued while a switch waits for its chunk, then where it happened."""
        if tab.pending_prompt is not None and stream is not None and stream.running:
            return f"prompt switch queued for the next chunk: {tab.pending_prompt!r}"
        if stream is not None and stream.switched_at is not None:
            return f"prompt switched at frame {stream.switched_at}: {stream.prompt!r}"
        return ""

    # event handlers ----------------------------------------------------------
    def _wait_ready(self, tab):
        import gradio as gr
        t0 = time.monotonic()
        while not self.ready.wait(0.5):
            yield (gr.skip(), gr.skip(), self.readout(tab, f"loading the model… {time.monotonic() - t0:.0f} s"),
                   gr.skip(), tab)
        if self.load_error:
            raise user_error(f"the model failed to load: {self.load_error}")

    def start(self, prompt, seed, tab, request=None, start="world"):
        """Generator: start a fresh stream for this tab and yield its frames paced to video rate.
        Yields (video, truth, readout, status, tab) updates."""
        tab = self._tab(tab, request)
        prompt = (prompt or "").strip() or self.default_prompt
        try:
            seed = int(seed) if seed is not None and str(seed).strip() != "" else 0
        except (TypeError, ValueError):
            raise user_error(f"seed must be an integer, got {seed!r}") from None
        if seed < 0:
            raise user_error(f"seed must be >= 0, got {seed}")
        start = start if self.world_model and start in ("world", "noise") else "noise"
        if not self.registry.register(tab):        # a Start still in flight when its page closed
            return
        stream = None
        try:
            yield from self._wait_ready(tab)
            if tab.stream is not None:
                tab.close(wait=5.0)
            if self.active_streams() >= self.max_sessions:
                raise user_error(f"the demo is at its limit of {self.max_sessions} concurrent streams; "
                                 "try again later")
            with tab._lock:
                tab.pending_prompt = None
                tab.pulses = []
            try:
                stream = Stream(self.stream_settings(), tab, prompt, seed, start=start)
            except Exception as e:       # bad prompt etc.
                raise user_error(str(e)) from None
            if self.registry.attach(tab, stream):  # (False: the page closed while it was made)
                yield from self._pump(tab, stream)
        except GeneratorExit:
            # gradio closes an event's generator when its client disconnected (or the event was
            # cancelled): nobody shows this stream (stopped by _pump); free the tab now, whether
            # or not gradio's unload arrives
            self.registry.forget(tab.session_hash, stream)
            raise

    def _pump(self, tab: TabState, stream: Stream):
        """Yield ``stream``'s frames paced to video rate until it stops; the stream is stopped
        on the way out, however that happens."""
        import gradio as gr
        next_t = None
        last_readout, last_status = 0.0, ""
        try:
            yield gr.skip(), gr.skip(), self.readout(tab, "starting"), "", tab
            while tab.stream is stream and not stream.stop_evt.is_set():
                try:
                    frame, truth, boundary, _ = stream.q.get(timeout=0.1)
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
                img = self.upscale(frame)
                gt = self.upscale(truth) if truth is not None and tab.show_truth else gr.skip()
                status = self.switch_status(tab, stream)
                if boundary or now - last_readout > 0.5 or status != last_status:
                    last_readout = now
                    st_out = status if status != last_status else gr.skip()
                    last_status = status
                    yield img, gt, self.readout(tab), st_out, gr.skip()
                else:
                    yield img, gt, gr.skip(), gr.skip(), gr.skip()
        finally:
            stream.stop()
            if tab.stream is stream:
                tab.stream = None
        stream.done.wait(5.0)                # the worker's last chunk is in (or dropped) before the count
        if stream.error is not None:
            raise user_error(f"generation failed: {stream.stats()['error']}")
        yield gr.skip(), gr.skip(), self.readout(tab, "stopped"), self.switch_status(tab, stream), gr.skip()

    def stop(self, tab, request=None):
        tab = self._tab(tab, request)
        s = tab.stream
        tab.close(wait=5.0)
        return self.readout(tab, "stopped"), self.switch_status(tab, s)

    def switch_prompt(self, prompt, tab, request=None):
        from streamgen.codecs.text import check_prompt
        tab = self._tab(tab, request)
        try:
            prompt = check_prompt((prompt or "").strip() or self.default_prompt,
                                  self.pipe.config.max_prompt_chars if self.pipe else 2000)
        except Exception as e:
            raise user_error(str(e)) from None
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

    def download(self, tab, request=None, how: str = "nearest"):
        """-> (path, label): the MP4 of the frames so far (opening frames first)."""
        tab = self._tab(tab, request)
        s = tab.stream or tab.last_stream
        if s is None:
            raise user_error("nothing generated yet: press Start first")
        for old in os.listdir(self.tmpdir):          # gradio serves its own copy; drop stale ones
            fp = os.path.join(self.tmpdir, old)
            try:
                if time.time() - os.path.getmtime(fp) > 600:
                    os.remove(fp)
            except OSError:
                pass
        try:
            return s.write_mp4(self.tmpdir, how if how in DOWNLOADS else "nearest")
        except ValueError as e:
            raise user_error(str(e)) from None

    def unload(self, request=None):
        """gradio's unload (the page's heartbeat dropped): free the tab for good."""
        self.registry.unload(getattr(request, "session_hash", None))

    def stream_settings(self) -> StreamSettings:
        # the idle watchdog's release drops the tab like a closed event generator does
        return StreamSettings(self.pipe, self.pipe_lock, self.info, self.world_model, self.has_actions,
                              self.idle_timeout, self.max_record_bytes, self.registry.forget)

    def on_state_deleted(self, tab):
        if isinstance(tab, TabState):
            self.registry.deleted(tab)

    # UI ------------------------------------------------------------------------
    def build(self, title: str = "streamgen live demo"):
        import gradio as gr
        d = self.info
        space = d["action_space"]
        app = self

        def start(prompt, seed, start_from, tab, request: gr.Request):
            yield from app.start(prompt, seed, tab, request, start=start_from)

        def stop(tab, request: gr.Request):
            return app.stop(tab, request)

        def switch(prompt, tab, request: gr.Request):
            return app.switch_prompt(prompt, tab, request)

        def set_input(payload, tab, request: gr.Request):
            app.set_input(payload, tab, request)

        def download(how, tab, request: gr.Request):
            path, label = app.download(tab, request, how)
            return gr.File(value=path, visible=True, label=label)

        def unload(request: gr.Request):
            app.unload(request)

        def new_seed():
            return int(np.random.randint(0, 2**31 - 1))

        def show_truth(on, tab, request: gr.Request):
            app._tab(tab, request).show_truth = bool(on)
            return gr.Image(visible=bool(on))

        model_line = (f"model **{d['source']}** · {d['width']}×{d['height']} @ {d['fps']} fps · "
                      f"{d['chunk_frames']} frames/chunk · {d['steps']} steps")
        n_open = d["chunk_frames"] if d["chunk_frames"] > 0 else 0
        k = upscale_factor(d["height"], d["width"])
        with gr.Blocks(title=title, delete_cache=(60, 120)) as demo:
            tab = gr.State(TabState(), delete_callback=self.on_state_deleted)
            gr.Markdown(f"## streamgen — real-time streaming video\n{model_line}", elem_id="sg-title")
            if self.card:
                gr.Markdown(f"**What this model can and cannot do** (model card): {self.card}", elem_id="sg-card")
            if not d["trained"]:
                msg = self.notice or "this model has random, untrained weights"
                gr.HTML(f'<div id="sg-untrained">⚠ RANDOM WEIGHTS / untrained — {msg}. The frames only '
                        'exercise the engine (speed, plumbing); they are not a trained model\'s video.</div>')
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=360):
                    with gr.Row(equal_height=True):
                        video = gr.Image(label="model (live)", type="numpy", format="png", interactive=False,
                                         elem_id="sg-video", height=self.display_size + 40,
                                         buttons=["fullscreen"], placeholder="press Start")
                        truth = gr.Image(label="ground truth (the world renderer)",
                                         type="numpy", format="png", interactive=False, elem_id="sg-truth",
                                         height=self.display_size + 40, buttons=["fullscreen"],
                                         placeholder="the world's own rendering appears here",
                                         visible=self.world_model)
                    if self.world_model:
                        gr.Markdown(f"**Opening frames**: with *start from: world renderer* the first {n_open} frames "
                                    "come from the built-in world renderer (the prompt's look at the seed's spawn), "
                                    "not from the model; the model continues from them. The right panel is the "
                                    "world itself under the same look, seed and actions: the ground truth.",
                                    elem_id="sg-start-note")
                    if self.has_actions:
                        gr.Markdown("**Controls** — hold **W/A/S/D** to move, **←/→** to turn (**↑/↓** look), "
                                    "or **drag on the video** to turn; or hold the buttons below. Same keys on "
                                    "`streamgen serve`'s page. Inputs apply at the next chunk.", elem_id="sg-help")
                        with gr.Row(elem_id="sg-pad"):
                            btn_left = gr.Button("⟲ turn left", elem_id="sg-turn-left", size="sm")
                            key_btns = {}
                            for key in KEY_BUTTONS:
                                if key in space["keys"]:
                                    key_btns[key] = gr.Button(key, elem_id=f"sg-key-{key}", size="sm")
                            btn_right = gr.Button("turn right ⟳", elem_id="sg-turn-right", size="sm")
                with gr.Column(scale=2, min_width=300):
                    prompt = gr.Textbox(value=self.default_prompt, label="prompt", lines=2, max_lines=4,
                                        elem_id="sg-prompt")
                    if self.world_model:
                        from streamgen.world.scene import THEMES, TIMES, WEATHERS, parse_prompt
                        look = parse_prompt(self.default_prompt)
                        with gr.Row(elem_id="sg-look"):
                            pick = [gr.Dropdown(list(vals), value=getattr(look, name), label=name, min_width=90,
                                                elem_id=f"sg-{name}")
                                    for name, vals in (("theme", THEMES), ("time", TIMES), ("weather", WEATHERS))]
                        gr.Markdown("The world models know these looks (6 themes × 4 times × 3 weathers); "
                                    "picking one writes its prompt.", elem_id="sg-look-help")
                    with gr.Row():
                        switch_btn = gr.Button("Switch prompt (no restart)", elem_id="sg-switch", size="sm")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="seed", elem_id="sg-seed", minimum=0)
                        dice = gr.Button("random seed", size="sm", elem_id="sg-dice")
                    start_from = gr.Radio(START_CHOICES, value="world" if self.world_model else "noise",
                                          label="start from", elem_id="sg-start-from", visible=self.world_model)
                    truth_on = gr.Checkbox(value=True, label="show the ground truth beside the model",
                                           elem_id="sg-truth-on", visible=self.world_model)
                    with gr.Row():
                        start_btn = gr.Button("▶ Start", variant="primary", elem_id="sg-start")
                        stop_btn = gr.Button("■ Stop", variant="stop", elem_id="sg-stop")
                    status = gr.Markdown("", elem_id="sg-status")
                    readout = gr.Markdown(self.readout(TabState()), elem_id="sg-readout")
                    sizes = ([(f"{k}× nearest ({d['width'] * k}×{d['height'] * k})", "nearest"),
                              (f"{k}× Lanczos ({d['width'] * k}×{d['height'] * k})", "lanczos")] if k > 1 else [])
                    how = gr.Radio(sizes + [(f"native ({d['width']}×{d['height']})", "native")],
                                   value=sizes[0][1] if sizes else "native", label="MP4 size", elem_id="sg-mp4-size")
                    dl_btn = gr.Button("⬇ Download MP4 (frames so far)", elem_id="sg-download", size="sm")
                    mp4 = gr.File(label="MP4 of the frames so far", elem_id="sg-mp4", interactive=False, visible=False)
            # Page -> server input channel: the page JS stores its input state in window.__sgInput
            # and clicks this hidden button; the event's js returns that state as the payload.
            action_box = gr.Textbox(visible="hidden", elem_id="sg-input", label="input")
            send_btn = gr.Button("send input", visible="hidden", elem_id="sg-send")

            start_btn.click(start, [prompt, seed, start_from, tab], [video, truth, readout, status, tab],
                            api_name="start", concurrency_limit=self.max_sessions, concurrency_id="sg-stream",
                            show_progress="hidden")
            stop_btn.click(stop, [tab], [readout, status], api_name="stop", concurrency_limit=None,
                           show_progress="hidden")
            switch_btn.click(switch, [prompt, tab], [status], api_name="switch_prompt",
                             concurrency_limit=None, show_progress="hidden")
            prompt.submit(switch, [prompt, tab], [status], api_visibility="private",
                          concurrency_limit=None, show_progress="hidden")
            dice.click(new_seed, None, [seed], api_visibility="private", queue=False)
            dl_btn.click(download, [how, tab], [mp4], api_name="download_mp4", concurrency_limit=None)
            truth_on.change(show_truth, [truth_on, tab], [truth], api_name="show_truth", concurrency_limit=None,
                            show_progress="hidden")
            if self.world_model:
                for p in pick:
                    p.input(look_prompt, pick, [prompt], api_visibility="private", queue=False)
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
    from streamgen.cli_args import load_pipeline as load
    args = _parser().parse_args(["--model", model, "--device", device, "--attn-backend", attn_backend,
                                 "--dtype", dtype] + (["--random-weights"] if random_weights else []))
    args.steps, args.config = steps, config
    return load(args, fallback=fallback)


def build_demo(pipe_or_model_name, *, device: str = "cpu", attn_backend: str = "sdpa",
               random_weights: bool = False, display_size: int = 384, idle_timeout: float = 60.0,
               max_sessions: int = 8, max_record_mb: float = 512.0, notice: str | None = None,
               default_prompt: str = DEFAULT_PROMPT):
    """The demo as a ``gr.Blocks`` for a loaded ``Pipeline`` or a model name/path; serve it with
    :func:`launch` (or ``demo.queue().launch(...)``: the page installs its own JS/CSS)."""
    from streamgen.cli_args import model_card_line
    if isinstance(pipe_or_model_name, str):
        pipe, auto = load_pipeline(pipe_or_model_name, device=device, attn_backend=attn_backend,
                                   random_weights=random_weights)
        notice = notice or auto
    else:
        pipe = pipe_or_model_name
    app = DemoApp(pipe, display_size=display_size, idle_timeout=idle_timeout, max_sessions=max_sessions,
                  max_record_mb=max_record_mb, notice=notice, default_prompt=default_prompt,
                  card=model_card_line(pipe.source) if pipe.trained else None)
    return app.build()


def launch(demo, host: str = "127.0.0.1", port: int | None = None, **kw):
    """``demo.queue().launch(...)`` without blocking. Gradio's own probe of the local URL (one 3 s
    request, meant to detect hosted notebooks) is skipped: on a loaded machine it fails and aborts."""
    import inspect
    kw = {"server_name": host, "server_port": port, "prevent_thread_lock": True, "quiet": True, **kw}
    if "_frontend" in inspect.signature(demo.launch).parameters:
        kw["_frontend"] = False
    demo.queue(max_size=64).launch(**kw)
    return demo


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="streamgen demo", description="Interactive Gradio demo (live streaming).")
    add_model_args(ap)
    g = ap.add_argument_group("demo")
    g.add_argument("--port", type=int, default=7860, help="HTTP port")
    g.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt box's initial text")
    g.add_argument("--display-size", type=int, default=384, help="upscale small frames to about this many px")
    g.add_argument("--max-sessions", type=int, default=8, help="concurrent streams (browser tabs)")
    g.add_argument("--idle-timeout", type=float, default=60.0,
                   help="free a stream whose tab stopped pulling frames for this long (s)")
    g.add_argument("--no-fallback", action="store_true",
                   help="fail instead of falling back to untrained tiny-world when 'default' is missing")
    return ap


def main(argv: list[str] | None = None) -> int:
    import importlib.util
    t0 = time.perf_counter()
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    _log(f"starting: model {args.model} on {args.device}; the page comes up first, the model loads behind it")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # a local demo phones nobody
    if importlib.util.find_spec("gradio") is None:
        print("error: the demo needs gradio: pip install 'streamgen[demo]'", file=sys.stderr)
        return 2
    from streamgen import cli_args
    cli_args.check_model_args(args)
    if not args.prompt.strip():
        raise cli_args.ConfigError("--prompt is empty")
    cli_args.quiet_libraries()
    notice = None if args.no_fallback else cli_args.apply_fallback(args)
    cfg = cli_args.peek_config(args)
    if args.random_weights:
        notice = notice or f"'{args.model}' was loaded with --random-weights"
    app_kw = dict(display_size=args.display_size, idle_timeout=args.idle_timeout, max_sessions=args.max_sessions,
                  notice=notice, default_prompt=args.prompt,
                  card=None if args.random_weights else cli_args.model_card_line(args.model))
    if cfg is None:                 # a checkpoint path: its config needs the file, so load first
        _log(f"loading {args.model} …")
        pipe, notice2 = cli_args.load_pipeline(args)
        app = DemoApp(pipe, **{**app_kw, "notice": notice or notice2})
    else:
        info = describe_config(cfg, args.model, not args.random_weights, args.device, args.dtype, args.attn_backend)
        app = DemoApp(None, info=info, **app_kw)
    if notice:
        bar = "!" * 78
        print(f"{bar}\n!! RANDOM WEIGHTS / untrained: {notice}.\n!! The demo shows noise-like frames; "
              f"it only exercises the engine.\n{bar}", file=sys.stderr)
    _log("importing gradio …")
    demo = app.build()
    launch(demo, args.host, args.port, show_error=True, footer_links=["api"])
    _log(f"page up at http://{args.host}:{args.port} after {time.perf_counter() - t0:.1f} s"
         + ("" if app.ready.is_set() else "; loading the model (Start waits for it) …"))
    if not app.ready.is_set():
        try:
            pipe, _ = cli_args.load_pipeline(args)
        except Exception as e:        # noqa: BLE001 - shown in the page and the terminal, one line
            msg = str(e) if isinstance(e, cli_args.StreamgenError) else f"{type(e).__name__}: {e}"
            app.set_load_error(msg)
            print(f"error: {msg}", file=sys.stderr)
            demo.close()
            return 2
        app.set_pipeline(pipe)
    d = app.info
    _log(f"ready after {time.perf_counter() - t0:.1f} s: {d['source']} on {d['device']} "
         f"({d['dtype']}, attention {d['attn_backend']}) -> http://{args.host}:{args.port}  (Ctrl+C stops)")
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
