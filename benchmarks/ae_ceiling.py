"""python benchmarks/ae_ceiling.py --ae streamgen/assets/default/autoencoder.safetensors [--ae OTHER ...] [--grid grid.png]

The ceiling a latent world model can reach: each tiny-ae encodes and decodes the continuation
metric's held-out walks (8 walks, seeds 900700-900707, 27 frames each, as ``streamgen eval
--metrics continuation``). Prints one JSON line per autoencoder: PSNR and SSIM against the true
frames, and the share of the frames' edge energy (mean |image gradient|) its reconstruction
keeps. ``--grid`` writes the true frames above each autoencoder's reconstruction, to look at.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from streamgen.codecs.autoencoder import TinyAutoencoder
from streamgen.eval.continuation import psnr, ssim, walk
from streamgen.io.checkpoint import read_weights


def edge_energy(frames: np.ndarray) -> float:
    """Mean absolute horizontal + vertical difference of uint8 frames [N, H, W, 3]."""
    f = frames.astype(np.float64)
    return float(np.abs(np.diff(f, axis=1)).mean() + np.abs(np.diff(f, axis=2)).mean())


@torch.no_grad()
def reconstruct(ae: TinyAutoencoder, frames: np.ndarray) -> np.ndarray:
    v = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[None] / 127.5 - 1.0      # [1, T, 3, H, W]
    rec, _ = ae.decode_chunk(ae.encode(v), ae.init_state(1))
    return ((rec[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ae", action="append", required=True, help="tiny-ae weights (repeatable)")
    p.add_argument("--walks", type=int, default=8)
    p.add_argument("--seed", type=int, default=900000)
    p.add_argument("--grid", default=None, help="PNG: truth row, then one row per autoencoder (first walk)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    walks = [walk(a.seed + 700 + i, 27)["frames"] for i in range(a.walks)]
    rows = [np.concatenate(list(walks[0][::3]), 1)]
    for path in a.ae:
        sd, _ = read_weights(path)
        ae = TinyAutoencoder.from_state(sd, int(sd["latent_mean"].shape[0])).eval()
        recs = [reconstruct(ae, w) for w in walks]
        out = {"ae": path, "spatial_stride": ae.spatial_stride, "latent_channels": ae.latent_channels,
               "params": sum(x.numel() for x in ae.parameters()),
               "psnr": float(np.mean([psnr(r, w) for r, w in zip(recs, walks)])),
               "ssim": float(np.mean([ssim(r, w) for r, w in zip(recs, walks)])),
               "edge_energy_kept": float(np.mean([edge_energy(r) / edge_energy(w) for r, w in zip(recs, walks)]))}
        print(json.dumps(out), flush=True)
        rows.append(np.concatenate(list(recs[0][::3]), 1))
    if a.grid:
        from PIL import Image
        img = np.concatenate(rows, 0)
        Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(a.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
