"""python -m streamgen.training.export --run runs/default [--student dmd] [--teacher teacher] [--shift S] [--dest streamgen/assets/default]

Writes the shipped release: ``config.json`` (the PipelineConfig), ``model.safetensors`` (the
student's EMA weights, Wan key names, config in metadata), ``teacher.safetensors`` (the
bidirectional teacher students are distilled from), ``autoencoder.safetensors`` and a sample
GIF made by ``Pipeline.from_pretrained(dest)`` itself: the model beside the ground-truth world,
both opening from the same rendered chunk and driven by the same exploring walk. Every weight
file must be <= 16 MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from ..io.checkpoint import config_from_metadata, read_weights, save_release

DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "streamgen", "assets", "default")
LIMIT = 16 * 2 ** 20


def export(run: str, student: str = "dmd", dest: str = DEST, gif: str = "sample.gif", gif_seconds: float = 8.0,
           teacher: str = "teacher", shift: float | None = None) -> dict:
    os.makedirs(dest, exist_ok=True)
    sd, meta = read_weights(os.path.join(run, student, "release.safetensors"))
    cfg = config_from_metadata(meta)
    if shift is not None:                      # the release's sampler shift (a measured choice)
        if not shift > 0:
            raise SystemExit(f"--shift must be > 0, got {shift}")
        cfg["sampler"]["shift"] = float(shift)
    with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    save_release(os.path.join(dest, "model.safetensors"), sd, cfg)
    ae = os.path.join(run, "decoder", "release.safetensors")       # stage 8: the fine-tuned decoder
    if not os.path.exists(ae):
        ae = os.path.join(run, "autoencoder", "release.safetensors")
    if not os.path.exists(ae):                 # recipes that distil from the shipped teacher use its autoencoder
        ae = os.path.join(DEST, "autoencoder.safetensors")
    shutil.copyfile(ae, os.path.join(dest, "autoencoder.safetensors.tmp"))
    os.replace(os.path.join(dest, "autoencoder.safetensors.tmp"), os.path.join(dest, "autoencoder.safetensors"))
    files = ["model.safetensors", "autoencoder.safetensors"]
    if teacher:
        tsd, tmeta = read_weights(os.path.join(run, teacher, "release.safetensors"))
        save_release(os.path.join(dest, "teacher.safetensors"), tsd, config_from_metadata(tmeta))
        files.append("teacher.safetensors")
    for n in files + ["config.json"]:
        os.chmod(os.path.join(dest, n), 0o644)
    sizes = {n: os.path.getsize(os.path.join(dest, n)) for n in files}
    for n, s in sizes.items():
        if s > LIMIT:
            raise SystemExit(f"{n} is {s / 2**20:.1f} MiB > 16 MiB")
    if gif:
        write_sample(dest, os.path.join(dest, gif), seconds=gif_seconds)
    return {"dest": dest, "sizes": sizes, "student": student}


def sample_walk(pipe, seconds: float, seed: int, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model and the world from the same opening chunk under one exploring walk.

    -> (model frames [N, H, W, 3], world frames [N, H, W, 3], opening frames [k, H, W, 3])."""
    from ..world.episodes import opening_frames
    from ..world.policies import explore_policy, world_at
    k = pipe.config.sampler.chunk_frames
    opening, world = opening_frames(prompt, seed, k, size=pipe.config.width)
    n = max(1, int(seconds * pipe.config.fps / k)) * k
    walk = explore_policy(world_at(world.world, world.pose), np.random.default_rng([seed, 21]), n)
    s = pipe.session(prompt, seed=seed, start=opening)
    model, truth = [], []
    for c in range(0, n, k):
        model.append(s.step(walk[c:c + k]))
        truth += [world.step(a) for a in walk[c:c + k]]
    return np.concatenate(model), np.concatenate(truth), opening


def write_sample(model: str, path: str, seconds: float = 8.0, seed: int = 3,
                 prompt: str = "A first-person walk through a brick dungeon at sunset, clear visibility."):
    """The sample GIF: the model (left) beside the ground-truth world (right), both opening
    from the world's rendering of the same chunk and driven by the same exploring walk (turns
    included), at 2x for viewing."""
    from .logging import save_video
    pipe = load_release(model)
    video, gt, opening = sample_walk(pipe, seconds, seed, prompt)
    video, gt = np.concatenate([opening, video]), np.concatenate([opening, gt])
    gap = np.full((video.shape[0], video.shape[1], 2, 3), 255, np.uint8)
    pair = np.concatenate([video, gap, gt], axis=2)
    big = pair.repeat(2, axis=1).repeat(2, axis=2)                   # 2x for viewing
    save_video(path, big, fps=pipe.config.fps)
    return path


def load_ema(pipe, ckpt: str) -> None:
    """Copy a training checkpoint's EMA weights into ``pipe.model`` (same architecture)."""
    import torch
    ema = torch.load(ckpt, map_location="cpu", weights_only=True)["ema"]
    with torch.no_grad():
        for k, v in pipe.model.named_parameters():
            v.copy_(ema[k])


def load_release(folder: str, steps: int | None = None):
    """Pipeline of an exported release folder (its autoencoder.safetensors included)."""
    from ..engine.pipeline import Pipeline
    return Pipeline.from_pretrained(folder, steps=steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default", help="the recipe's output root")
    p.add_argument("--student", default="dmd", help="which student stage to ship (dmd | ode_init | consistency ...)")
    p.add_argument("--teacher", default="teacher", help="teacher stage to ship as teacher.safetensors ('' for none)")
    p.add_argument("--dest", default=DEST)
    p.add_argument("--shift", type=float, default=None,
                   help="sampler timestep shift written into the release (default: the student's; release 5 uses 1)")
    p.add_argument("--gif", default="sample.gif", help="sample file name in dest ('' for none)")
    a = p.parse_args(argv)
    print(json.dumps(export(a.run, a.student, a.dest, a.gif, teacher=a.teacher, shift=a.shift)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
