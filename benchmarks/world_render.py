"""python benchmarks/world_render.py [--size 64] [--frames 256] [--seconds 3]

Benchmarks the world renderer on one core (torch/numpy threads pinned to 1 via env vars set
before numpy is imported) and prints JSON with the command, machine and figures:
``batched_fps`` (a whole episode's poses rendered in one call, how datasets and
``generate_clip`` render), ``single_fps`` (one frame per call, how the ground-truth session
steps) and ``episode_fps`` (policy + poses + rendering of generate_clip).
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _rate(fn, frames_per_call: int, seconds: float) -> float:
    fn()  # warm-up (texture atlas, geometry caches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += frames_per_call
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=256, help="frames per batched call")
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    from streamgen.world.episodes import generate_clip
    from streamgen.world.policies import human_policy
    from streamgen.world.render import World, render
    from streamgen.world.scene import THEMES, Look

    w = World(0)
    poses = w.poses(human_policy(w, np.random.default_rng(0), args.frames))
    t = np.arange(args.frames)
    res = {}
    for theme in THEMES:
        look = Look(theme, "dusk", "hazy")
        res[theme] = round(_rate(lambda: render(w, poses, t, look, args.size), args.frames, args.seconds / 3), 1)
    look = Look("brick dungeon", "night", "foggy")
    batched = _rate(lambda: render(w, poses, t, look, args.size), args.frames, args.seconds)
    single = _rate(lambda: render(w, poses[:1], t[:1], look, args.size), 1, args.seconds)
    episode = _rate(lambda: generate_clip(1, args.frames, args.size, "human"), args.frames, args.seconds)
    print(json.dumps({
        "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "cpu_count": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS")},
        "size": args.size, "frames_per_call": args.frames,
        "batched_fps": round(batched, 1), "single_fps": round(single, 1), "episode_fps": round(episode, 1),
        "batched_fps_per_theme": res, "target_fps": 2000, "meets_target": batched >= 2000,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
