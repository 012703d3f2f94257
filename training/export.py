"""python -m streamgen.training.export --run runs/default [--student dmd] [--dest streamgen/assets/default]

Writes the shipped release: ``config.json`` (the PipelineConfig), ``model.safetensors`` (the
student's EMA weights, Wan key names, config in metadata), ``autoencoder.safetensors`` and a
sample GIF made by ``Pipeline.from_pretrained(dest)`` itself. Every weight file must be
<= 16 MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from ..checkpoint import config_from_metadata, read_weights, save_release

DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "streamgen", "assets", "default")
LIMIT = 16 * 2 ** 20


def export(run: str, student: str = "dmd", dest: str = DEST, gif: str = "sample.gif", gif_seconds: float = 4.0) -> dict:
    os.makedirs(dest, exist_ok=True)
    sd, meta = read_weights(os.path.join(run, student, "release.safetensors"))
    cfg = config_from_metadata(meta)
    with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    save_release(os.path.join(dest, "model.safetensors"), sd, cfg)
    shutil.copyfile(os.path.join(run, "autoencoder", "release.safetensors"), os.path.join(dest, "autoencoder.safetensors.tmp"))
    os.replace(os.path.join(dest, "autoencoder.safetensors.tmp"), os.path.join(dest, "autoencoder.safetensors"))
    for n in ("model.safetensors", "autoencoder.safetensors", "config.json"):
        os.chmod(os.path.join(dest, n), 0o644)
    sizes = {n: os.path.getsize(os.path.join(dest, n)) for n in ("model.safetensors", "autoencoder.safetensors")}
    for n, s in sizes.items():
        if s > LIMIT:
            raise SystemExit(f"{n} is {s / 2**20:.1f} MiB > 16 MiB")
    if gif:
        write_sample(dest, os.path.join(dest, gif), seconds=gif_seconds)
    return {"dest": dest, "sizes": sizes, "student": student}


def write_sample(model: str, path: str, seconds: float = 4.0, seed: int = 0,
                 prompt: str = "A first-person walk through a brick dungeon at sunset, clear visibility."):
    """A short streamed clip (walk forward, turn, walk) as a GIF: the model on the left, the
    ground-truth world under the same prompt and actions on the right (the model invents its
    own layout, so the right panel shows the look and the motion to expect, not the same place)."""
    from ..world.episodes import WorldSession
    from .logging import save_video
    pipe = load_release(model)
    s = pipe.session(prompt, seed=seed)
    world = WorldSession(prompt, seed, size=pipe.config.width)
    frames, truth = [], []
    n_chunks = max(1, int(seconds * pipe.config.fps / pipe.config.sampler.chunk_frames))
    for i in range(n_chunks):
        act = {"keys": ["W"], "mouse": [0.3 if (i // 4) % 2 else 0.0, 0.0]}
        out = s.step(act)
        frames.append(out)
        truth += [world.step(act) for _ in range(out.shape[0])]
    video = np.concatenate(frames)                                   # [N, H, W, 3]
    gt = np.concatenate(truth)
    gap = np.full((video.shape[0], video.shape[1], 2, 3), 255, np.uint8)
    pair = np.concatenate([video, gap, gt], axis=2)
    big = pair.repeat(2, axis=1).repeat(2, axis=2)                   # 2x for viewing
    save_video(path, big, fps=pipe.config.fps)
    return path


def load_release(folder: str, steps: int | None = None):
    """Pipeline of an exported release folder (its autoencoder.safetensors included)."""
    from ..pipeline import Pipeline
    return Pipeline.from_pretrained(folder, steps=steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default", help="the recipe's output root")
    p.add_argument("--student", default="dmd", help="which student stage to ship (dmd | ode_init | consistency ...)")
    p.add_argument("--dest", default=DEST)
    p.add_argument("--gif", default="sample.gif", help="sample file name in dest ('' for none)")
    a = p.parse_args(argv)
    print(json.dumps(export(a.run, a.student, a.dest, a.gif)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
