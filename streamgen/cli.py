"""streamgen --help

The `streamgen` command. `generate` and `bench` live here; the other subcommands are
forwarded to the module that owns them (world, eval, train, serve, client, demo), imported
only when called. Bad input prints one `error: ...` line and exits 2. The model-loading
flags are shared with `demo` and `serve` (:mod:`streamgen.cli_args`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

from . import __version__
from .cli_args import OneLineParser, add_model_args, build_pipeline
from .errors import ConfigError, StreamgenError

FORWARD = {
    "world": ("streamgen.world.cli", "procedural world: record videos, write training shards"),
    "eval": ("streamgen.eval.cli", "evaluate a model against the world's ground truth"),
    "train": ("streamgen.training.train", "train an autoencoder, teacher or student from a YAML config"),
    "serve": ("streamgen.server.cli", "run the streaming WebSocket server"),
    "client": ("streamgen.server.client", "stream from a server into an MP4"),
    "demo": ("streamgen.server.demo", "interactive Gradio demo"),
}

# names a look the world models know (theme, time of day, weather: see streamgen.world.scene)
DEFAULT_PROMPT = "a brick dungeon at dusk, light haze"
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

GENERATE_EPILOG = """\
The written MP4 begins with the opening frames (--start): for `world` and IMAGE/VIDEO starts its
first frames are those frames, not the model's; the model continues from them. --frames counts
every frame of the file, the opening frames included, and --actions / --switch-prompt use the
file's frame numbers (the opening frames' action lines are not used: those frames are given).

examples:
  streamgen generate --prompt "an ice cave at night, thick fog" --frames 96 --out ice.mp4
  streamgen generate --start noise --actions walk.jsonl --switch-prompt 48:"a lava forge at dusk"
  streamgen generate --start photo.png --model tiny-world --random-weights
"""


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="streamgen", description="Real-time streaming video generation.")
    ap.add_argument("--version", action="version", version=f"streamgen {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=OneLineParser)
    g = sub.add_parser("generate", help="generate a video file", description="Generate an MP4 with a model.",
                       epilog=GENERATE_EPILOG)
    add_model_args(g)
    o = g.add_argument_group("video")
    o.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="what to show; the world models know 6 themes x 4 times of day x 3 weathers "
                        "(e.g. 'an ice cave at night, thick fog')")
    o.add_argument("--frames", type=int, default=48, help="exact number of frames in the file (opening frames included)")
    o.add_argument("--seed", type=int, default=0, help="noise seed (and, with --start world, the world's layout)")
    o.add_argument("--out", default="out/streamgen.mp4", help="output .mp4 (folders are created)")
    o.add_argument("--start", default=None, metavar="noise|world|IMAGE|VIDEO",
                   help="opening frames: noise (none); world (the built-in world renders one chunk of the "
                        "prompt's look at the seed's spawn); IMAGE (one picture repeated to one chunk, "
                        "centre-cropped and resized); VIDEO (its first whole chunk(s), resized). "
                        "Default: world for models with an action space, else noise")
    o.add_argument("--actions", default=None, metavar="FILE.jsonl",
                   help='line i = action of video frame i, e.g. {"keys": ["W"], "mouse": [0.2, 0]}; '
                        "the last line holds after the file ends")
    o.add_argument("--switch-prompt", default=None, metavar="FRAME:TEXT",
                   help="switch to TEXT at the chunk that holds frame FRAME (no restart)")
    b = sub.add_parser("bench", help="measure generation speed (JSON)", description="Measure generation speed.")
    add_model_args(b)
    b.add_argument("--frames", type=int, default=48, help="frames to generate (whole chunks)")
    b.add_argument("--warmup-chunks", type=int, default=1, help="chunks generated before timing")
    b.add_argument("--json", action="store_true", help="one-line JSON instead of indented")
    b.add_argument("--compile", default="none", choices=["none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"],
                   help="torch.compile mode (reduce-overhead = CUDA graphs)")
    b.add_argument("--quant", default="none", choices=["none", "fp8"], help="fp8: torchao float8 linears")
    b.add_argument("--overlap-decode", default="off", choices=["off", "on"],
                   help="decode chunk i on a worker thread/stream while the DiT makes chunk i+1")
    for name, (_, help_) in FORWARD.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def _warn_untrained(pipe):
    if not pipe.trained:
        bar = "!" * 78
        print(f"{bar}\n!! RANDOM WEIGHTS: this model is NOT trained. The output is not a real video\n"
              f"!! model's output; it only exercises the engine (speed, plumbing).\n{bar}", file=sys.stderr)


# ------------------------------------------------------------------ frame bookkeeping
def _wan_first(pipe) -> bool:
    """Does the decoder give 1 + ts(k-1) frames for the stream's first chunk (Wan / TAEHV)?"""
    c = pipe.config
    return c.temporal_stride > 1 and c.vae in ("wan", "taehv")


def chunk_video_frames(pipe, first: bool) -> int:
    """Video frames one chunk decodes to (``first``: the stream's first decoded chunk)."""
    c = pipe.config
    k, ts = c.sampler.chunk_frames, c.temporal_stride
    return 1 + ts * (k - 1) if first and _wan_first(pipe) else k * ts


def _latent_offsets(pipe, first: bool) -> list[int]:
    """Offset of each latent frame's first video frame inside its chunk."""
    c = pipe.config
    k, ts = c.sampler.chunk_frames, c.temporal_stride
    if first and _wan_first(pipe):
        return [0] + [1 + ts * (j - 1) for j in range(1, k)]
    return [j * ts for j in range(k)]


def chunk_actions(pipe, actions, first_frame: int, first: bool):
    """Per-latent-frame actions of the chunk starting at video frame ``first_frame`` (last line holds)."""
    if not actions:
        return None
    return [actions[min(first_frame + o, len(actions) - 1)] for o in _latent_offsets(pipe, first)]


def start_chunk_frames(pipe, chunks: int = 1) -> int:
    """Video frames of ``chunks`` whole opening chunks (what Pipeline.session(start=...) accepts)."""
    c = pipe.config
    k, ts = c.sampler.chunk_frames, c.temporal_stride
    return chunks * k * ts if ts == 1 else 1 + ts * (chunks * k - 1)


# ------------------------------------------------------------------ opening frames
def _fit(img, w: int, h: int):
    """PIL image -> uint8 [h, w, 3]: centre-crop to the model's aspect, then Lanczos resize."""
    import numpy as np
    from PIL import Image
    img = img.convert("RGB")
    iw, ih = img.size
    if iw * h != ih * w:
        if iw * h > ih * w:
            cw = max(1, round(ih * w / h))
            img = img.crop(((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih))
        else:
            ch = max(1, round(iw * h / w))
            img = img.crop((0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch))
    return np.asarray(img.resize((w, h), Image.LANCZOS), dtype=np.uint8)


def check_start_arg(spec: str | None) -> None:
    """Before loading: --start is noise, world or an existing file."""
    if spec in (None, "noise", "world"):
        return
    if not os.path.isfile(spec):
        raise ConfigError(f"--start takes noise, world, an image or a video file; {spec!r} is none of these "
                          "(no such file)")


def load_start(spec: str, pipe, max_frames: int):
    """--start IMAGE|VIDEO -> (uint8 frames [N, H, W, 3], description). N is one chunk for an
    image, and the video's first whole chunks (at most what the cache holds, and fewer frames
    than ``max_frames``) for a video."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    c = pipe.config
    one = start_chunk_frames(pipe, 1)
    if spec.lower().endswith(IMAGE_EXT):
        try:
            with Image.open(spec) as im:
                size = im.size
                frame = _fit(im, c.width, c.height)
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"--start {spec}: not a readable image ({e})") from None
        desc = f"{spec} (one {size[0]}x{size[1]} picture repeated {one}x, centre-cropped and resized to {c.width}x{c.height})"
        return np.repeat(frame[None], one, axis=0), desc
    import av
    cap = max(1, (c.cache.sink_frames + c.cache.ring_frames - c.sampler.chunk_frames) // c.sampler.chunk_frames)
    frames, size = [], None
    try:
        with av.open(spec) as f:
            for vf in f.decode(video=0):
                img = vf.to_image()
                size = size or img.size
                frames.append(_fit(img, c.width, c.height))
                if len(frames) >= start_chunk_frames(pipe, cap):
                    break
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ConfigError(f"--start {spec}: not a readable image or video ({e})") from None
    chunks = 0
    while (chunks < cap and start_chunk_frames(pipe, chunks + 1) <= len(frames)
           and start_chunk_frames(pipe, chunks + 1) < max_frames):
        chunks += 1
    if chunks == 0:
        if len(frames) < one:
            raise ConfigError(f"--start {spec}: the video has {len(frames)} frame(s); one chunk needs {one}")
        raise ConfigError(f"--frames {max_frames} leaves no room to generate after a {one}-frame opening chunk")
    n = start_chunk_frames(pipe, chunks)
    desc = f"{spec} (its first {n} frames, {size[0]}x{size[1]} centre-cropped and resized to {c.width}x{c.height})"
    return np.ascontiguousarray(np.stack(frames[:n])), desc


def _parse_switch(text: str | None, frames: int):
    if not text:
        return None
    at, _, prompt = text.partition(":")
    if not at.isdigit() or not prompt.strip():
        raise ConfigError("--switch-prompt takes FRAME:TEXT, e.g. 48:an ice cave")
    at = int(at)
    if not 0 < at < frames:
        raise ConfigError(f"--switch-prompt frame {at} is not inside the video: it must be in 1..{frames - 1} "
                          f"(--frames {frames})")
    return at, prompt


def _check_actions_file(path: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            empty = not any(line.strip() for line in f)
    except OSError as e:
        raise ConfigError(f"cannot read actions file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"actions file {path} is not UTF-8 text (JSONL expected)") from None
    if empty:
        raise ConfigError(f"actions file {path} is empty: give one JSON action per line, "
                          '{"keys": ["W"], "mouse": [0, 0]}, or leave --actions out')


# ------------------------------------------------------------------ commands
def cmd_generate(args) -> int:
    from .codecs.text import check_prompt
    if args.frames <= 0:
        raise ConfigError(f"--frames must be > 0, got {args.frames}")
    check_prompt(args.prompt)                         # before the weights load
    switch = _parse_switch(args.switch_prompt, args.frames)
    if switch:
        check_prompt(switch[1])
    check_start_arg(args.start)
    if args.actions:
        _check_actions_file(args.actions)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    print(f"generate: model {args.model}, {args.frames} frames, seed {args.seed} -> {args.out}\n"
          f"          prompt {args.prompt!r}" + (" (the default; set it with --prompt)"
                                                 if args.prompt == DEFAULT_PROMPT else ""), flush=True)
    pipe = build_pipeline(args)
    return generate(pipe, args, switch, out_dir)


def generate(pipe, args, switch, out_dir: str) -> int:
    from tqdm import tqdm
    from .io.actions import load_actions_jsonl
    from .io.video import Mp4Writer
    c = pipe.config
    space = c.model.actions
    actions = load_actions_jsonl(args.actions, space) if args.actions else None
    _warn_untrained(pipe)
    start = args.start or ("world" if space.enabled else "noise")
    frames_in, desc = None, None
    if start not in ("noise", "world"):
        frames_in, desc = load_start(start, pipe, args.frames)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {out_dir}: {e.strerror or e}") from None
    t0 = time.perf_counter()
    session = pipe.session(args.prompt, seed=args.seed,
                           start=None if start == "noise" else "world" if start == "world" else frames_in)
    opening = session.start_frames
    n_open = 0 if opening is None else len(opening)
    if n_open >= args.frames:
        raise ConfigError(f"--frames {args.frames} leaves no room to generate after the {n_open} opening frames "
                          f"(--start {start}); ask for more frames or pass --start noise")
    if switch and switch[0] < n_open:
        raise ConfigError(f"--switch-prompt frame {switch[0]} falls in the opening frames 0..{n_open - 1}; "
                          f"the model generates from frame {n_open}")
    first = opening is None                           # the decoder's first chunk is still to come
    est = n_open + chunk_video_frames(pipe, first)
    total_chunks = 1 + max(0, -(-(args.frames - est) // chunk_video_frames(pipe, False)))
    first_latency, written, switched = None, 0, False
    try:
        writer = Mp4Writer(args.out, c.fps, c.width, c.height)
    except OSError as e:
        raise ConfigError(f"cannot write {args.out}: {e.strerror or e}") from None
    with writer as w, tqdm(total=total_chunks, desc="chunks", unit="chunk", file=sys.stderr) as bar:
        if n_open:
            w.write(opening[: args.frames])
            written = n_open
        while written < args.frames:
            if switch and not switched and switch[0] < written + chunk_video_frames(pipe, first):
                session.set_prompt(switch[1])
                switched = True
            frames = session.step(chunk_actions(pipe, actions, written, first))
            first = False
            if first_latency is None:
                first_latency = time.perf_counter() - t0
            frames = frames[: args.frames - written]
            w.write(frames)
            written += len(frames)
            bar.update(1)
    dt = time.perf_counter() - t0
    source = {"noise": "none (the model starts from noise)",
              "world": f"{n_open} from the world renderer (frames 0-{n_open - 1})"}.get(
        start, f"{n_open} from {desc} (frames 0-{n_open - 1})")
    gen = written - n_open
    print(f"wrote {args.out} ({written} frames, {c.width}x{c.height} @ {c.fps} fps)")
    print(f"opening frames: {source}; generated {gen} frames")
    print(f"speed: {gen / dt:.1f} frames/s; first-frame latency: {first_latency:.3f} s; "
          f"device {pipe.device}, {pipe.describe()['dtype']}, attention {pipe.attn_backend}"
          + ("" if pipe.trained else "  [RANDOM WEIGHTS]"))
    return 0


def _peak_memory(device) -> float:
    import torch
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_bench(args) -> int:
    if args.frames <= 0:
        raise ConfigError(f"--frames must be > 0, got {args.frames}")
    import torch
    from .engine.compile import compile_model
    from .engine.fp8 import quantize_fp8
    from .engine.overlapped_decode import OverlappedDecoder
    pipe = build_pipeline(args)
    quantize_fp8(pipe.model, args.quant)
    compile_model(pipe.model, args.compile)
    c = pipe.config
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    per_chunk = c.sampler.chunk_frames * c.temporal_stride
    n_chunks = max(1, -(-args.frames // per_chunk))
    session = pipe.session("a benchmark prompt", seed=0)
    for _ in range(args.warmup_chunks):
        session.step()
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    session = pipe.session("a benchmark prompt", seed=1)
    overlap = OverlappedDecoder(pipe.vae, pipe.to_uint8, pipe.device) if args.overlap_decode == "on" else None
    dit, dec, total = [], [], []
    t_start = time.perf_counter()
    first, pending, state, n_frames = None, None, session.vae_state, 0

    def finish(p):  # wait for an overlapped decode; p = (future, chunk start, dit end)
        nonlocal first, state, n_frames
        frames, state = p[0].result()
        t2 = time.perf_counter()
        n_frames += len(frames)
        dec.append(t2 - p[2]), total.append(t2 - p[1])
        if first is None:
            first = t2 - t_start
    for _ in range(n_chunks):
        t0 = time.perf_counter()
        x0 = session.step_latents()
        sync()
        t1 = time.perf_counter()
        dit.append(t1 - t0)
        if overlap is not None:
            if pending is not None:
                finish(pending)                      # chunk i-1's frames (decoded during chunk i)
            pending = (overlap.submit(x0, state), t0, t1)
            continue
        frames, state = pipe.vae.decode_chunk(x0, state)
        n_frames += len(pipe.to_uint8(frames[0]))
        sync()
        t2 = time.perf_counter()
        dec.append(t2 - t1), total.append(t2 - t0)
        if first is None:
            first = t2 - t_start
    if pending is not None:
        finish(pending)
        overlap.close()
    wall = time.perf_counter() - t_start
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    res = {
        "command": "streamgen bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if pipe.device.type == "cuda" else None,
                    "torch": torch.__version__},
        "model": args.model, "trained": pipe.trained, "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""), "attn_backend": pipe.attn_backend,
        "threads": torch.get_num_threads(), "height": c.height, "width": c.width, "steps": len(c.sampler.denoising_steps),
        "chunk_frames": per_chunk, "chunks": n_chunks, "frames": n_frames,
        "fps": n_frames / wall, "first_frame_latency_s": first,
        "chunk_latency_p50_s": q(total, 0.5), "chunk_latency_p99_s": q(total, 0.99),
        "dit_chunk_p50_s": q(dit, 0.5), "decoder_chunk_p50_s": q(dec, 0.5),
        "dit_fps": per_chunk / q(dit, 0.5), "peak_memory_mb": _peak_memory(pipe.device),
        "cache_memory_mb": session.cache.memory_bytes() / 2**20,
        "vae": c.vae, "compile": args.compile, "quant": args.quant, "overlap_decode": args.overlap_decode,
    }
    print(json.dumps(res, indent=None if args.json else 2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if argv and argv[0] in FORWARD:
        module, _ = FORWARD[argv[0]]
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"error: `streamgen {argv[0]}` is unavailable: {e}", file=sys.stderr)
            return 2
        try:
            return int(mod.main(argv[1:]) or 0)
        except StreamgenError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        return 0
    try:
        return {"generate": cmd_generate, "bench": cmd_bench}[args.cmd](args)
    except StreamgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
