"""streamgen --help

The `streamgen` command. `generate` and `bench` live here; the other subcommands are
forwarded to the module that owns them (world, eval, train, serve, client, demo), imported
only when called. Bad input prints one `error: ...` line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time

from .errors import ConfigError, StreamgenError

FORWARD = {
    "world": ("streamgen.world.cli", "procedural world: record videos, write training shards"),
    "eval": ("streamgen.eval.cli", "evaluate a model against the world's ground truth"),
    "train": ("streamgen.training.train", "train an autoencoder, teacher or student from a YAML config"),
    "serve": ("streamgen.server.cli", "run the streaming WebSocket server"),
    "client": ("streamgen.server.client", "stream from a server into an MP4"),
    "demo": ("streamgen.server.demo", "interactive Gradio demo"),
}

DEFAULT_PROMPT = "a stone dungeon corridor lit by torches"


def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", default="default", help="shipped model name, preset name, or checkpoint path")
    p.add_argument("--config", default=None, help="pipeline preset for checkpoints that carry no config")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn-backend", default="sdpa", help="sdpa | triton | flex | xformers | flash | math")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: model's)")
    p.add_argument("--random-weights", action="store_true", help="random init (speed tests, untrained)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--text-encoder-path", default=None, help="local UMT5 directory (Wan models)")
    p.add_argument("--vae-path", default=None, help="local AutoencoderKLWan directory (Wan models)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (small models run best with 1 on a busy machine)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="streamgen", description="Real-time streaming video generation.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    g = sub.add_parser("generate", help="generate a video file")
    _common(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--frames", type=int, default=48, help="exact number of video frames")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="out/streamgen.mp4")
    g.add_argument("--actions", default=None, help="JSONL file, line i = action of video frame i")
    g.add_argument("--switch-prompt", default=None, metavar="FRAME:TEXT", help="switch prompt at a frame")
    b = sub.add_parser("bench", help="measure generation speed (JSON)")
    _common(b)
    b.add_argument("--frames", type=int, default=48)
    b.add_argument("--warmup-chunks", type=int, default=1)
    b.add_argument("--json", action="store_true")
    b.add_argument("--vae", default=None, choices=["preview", "wan", "taehv", "tiny-ae"],
                   help="decoder to time (default: the model's); taehv = the fast causal decoder")
    b.add_argument("--compile", default="none", help="none | default | max-autotune | reduce-overhead (CUDA graphs)")
    b.add_argument("--quant", default="none", choices=["none", "fp8"], help="fp8: torchao float8 linears")
    b.add_argument("--overlap-decode", default="off", choices=["off", "on"],
                   help="decode chunk i on a worker thread/stream while the DiT makes chunk i+1")
    for name, (_, help_) in FORWARD.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def _load(args):
    import torch
    from .pipeline import Pipeline
    if args.threads is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads must be > 0, got {args.threads}")
        torch.set_num_threads(args.threads)
    over = {}
    if args.height is not None:
        over["height"] = args.height
    if args.width is not None:
        over["width"] = args.width
    if getattr(args, "vae", None):
        over["vae"] = args.vae
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    attn_backend=args.attn_backend, random_weights=args.random_weights,
                                    config=args.config, steps=args.steps,
                                    text_encoder_path=args.text_encoder_path, vae_path=args.vae_path, **over)
    if args.threads is None and pipe.device.type == "cpu" and pipe.config.model.dim <= 512:
        # small models gain nothing from intra-op threads, and spinning threads collapse
        # throughput (100x measured) when another process shares the cores
        torch.set_num_threads(1)
    return pipe


def _warn_untrained(pipe):
    if not pipe.trained:
        bar = "!" * 78
        print(f"{bar}\n!! RANDOM WEIGHTS: this model is NOT trained. The output is not a real video\n"
              f"!! model's output; it only exercises the engine (speed, plumbing).\n{bar}", file=sys.stderr)


def _chunk_actions(pipe, actions, chunk_index):
    """Per-latent-frame actions of one chunk from a per-video-frame list (last one holds)."""
    if not actions:
        return None
    c = pipe.config
    k, ts = c.sampler.chunk_frames, c.temporal_stride
    first = chunk_index * k
    return [actions[min((first + j) * ts, len(actions) - 1)] for j in range(k)]


def cmd_generate(args) -> int:
    from tqdm import tqdm
    from .actions import load_actions_jsonl
    from .video import Mp4Writer
    if args.frames <= 0:
        raise ConfigError(f"--frames must be > 0, got {args.frames}")
    switch = None
    if args.switch_prompt:
        at, _, text = args.switch_prompt.partition(":")
        if not at.isdigit() or not text.strip():
            raise ConfigError("--switch-prompt takes FRAME:TEXT, e.g. 48:an ice cave")
        switch = (int(at), text)
    pipe = _load(args)
    actions = load_actions_jsonl(args.actions, pipe.config.model.actions) if args.actions else None
    _warn_untrained(pipe)
    c = pipe.config
    per_chunk = c.sampler.chunk_frames * c.temporal_stride
    n_chunks = math.ceil(args.frames / per_chunk)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.perf_counter()
    session = pipe.session(args.prompt, seed=args.seed)
    first_latency, written = None, 0
    with Mp4Writer(args.out, c.fps, c.width, c.height) as w:
        for i in tqdm(range(n_chunks), desc="chunks", unit="chunk", file=sys.stderr):
            if switch and i * per_chunk <= switch[0] < (i + 1) * per_chunk and i > 0:
                session.set_prompt(switch[1])
            frames = session.step(_chunk_actions(pipe, actions, i))
            if first_latency is None:
                first_latency = time.perf_counter() - t0
            frames = frames[: args.frames - written]
            w.write(frames)
            written += len(frames)
    dt = time.perf_counter() - t0
    print(f"wrote {args.out} ({written} frames, {c.width}x{c.height} @ {c.fps} fps)")
    print(f"speed: {written / dt:.1f} frames/s; first-frame latency: {first_latency:.3f} s; "
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
    import torch
    from .streaming import generate_chunk
    if args.frames <= 0:
        raise ConfigError(f"--frames must be > 0, got {args.frames}")
    from .compile import OverlappedDecoder, compile_model, quantize_fp8
    pipe = _load(args)
    quantize_fp8(pipe.model, args.quant)
    compile_model(pipe.model, args.compile)
    c = pipe.config
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    per_chunk = c.sampler.chunk_frames * c.temporal_stride
    n_chunks = max(1, math.ceil(args.frames / per_chunk))
    session = pipe.session("a benchmark prompt", seed=0)
    for _ in range(args.warmup_chunks):
        session.step()
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    session = pipe.session("a benchmark prompt", seed=1)
    overlap = OverlappedDecoder(pipe.vae, pipe.to_uint8, pipe.device) if args.overlap_decode == "on" else None
    dit, dec, total = [], [], []
    t_start = time.perf_counter()
    first, pending, state = None, None, session.vae_state

    def finish(p):  # wait for an overlapped decode; p = (future, chunk start, dit end)
        nonlocal first, state
        frames, state = p[0].result()
        t2 = time.perf_counter()
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
        pipe.to_uint8(frames[0])
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
        "chunk_frames": per_chunk, "chunks": n_chunks, "frames": n_chunks * per_chunk,
        "fps": n_chunks * per_chunk / wall, "first_frame_latency_s": first,
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
