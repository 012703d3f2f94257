"""python scripts/sample_grid.py --model streamgen/assets/default --out grid.png [--ckpt runs/.../step-N.pt] [--seeds 3,5,8]

A picture to look at before believing a metric: for each seed, one row of the model and one
row of the ground-truth world beneath it, both opening from the same rendered chunk and driven
by the same exploring walk (every 6th frame, 6 s). ``--ckpt`` loads the EMA weights of a
training checkpoint into the model first (to look at a run while it trains).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="release folder, shipped name or release file")
    p.add_argument("--vae", default=None, help="tiny-ae weights when the model file has no sibling")
    p.add_argument("--ckpt", default=None, help="training checkpoint whose EMA weights to load")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="3,5,8,13")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--prompt", default=None, help="default: each seed's own caption")
    a = p.parse_args(argv)
    from PIL import Image

    from streamgen import Pipeline
    from streamgen.training.export import load_ema, sample_walk
    from streamgen.world.episodes import scene_for
    pipe = Pipeline.from_pretrained(a.model, vae_path=a.vae)
    if a.ckpt:
        load_ema(pipe, a.ckpt)
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        prompt = a.prompt or scene_for(seed)[1]
        model, truth, _ = sample_walk(pipe, a.seconds, seed, prompt)
        rows.append(np.concatenate(list(model[::a.every]), 1))
        rows.append(np.concatenate(list(truth[::a.every]), 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows, 0)).save(a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
