"""python benchmarks/action_probe.py --student MODEL [--teacher TEACHER ...] [--walks 16] [--t 1000]

Does a model's one-step prediction depend on the keys? For held-out exploring walks: the first
``--context`` chunks are clean latents (t = 0), the next chunk is pure noise at ``--t``, and the
model predicts that chunk's x0 twice, once under "turn left" and once under "turn right"
(mouse dx -1 / +1 on every frame), with the same noise. It prints JSON per model:

  x0_lr         mean |x0(left) - x0(right)| over the chunk's latents (0: the keys do nothing)
  true_lr       the same for the true latents of the two walks' continuations (what the keys do
                in the world)
  ratio         x0_lr / true_lr

This is the diagnosis behind release 4's recipe (MODEL_CARD.md): at t = 1000 nothing but the
context and the actions can explain the chunk, so a model that reads the keys must move here.
Students (``--student``) run block-causally, clip teachers (``--teacher``) bidirectionally. A
model is a release folder, a release ``.safetensors`` (``--vae`` gives its autoencoder) or
"default".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from streamgen import Pipeline
from streamgen.engine.sampling import add_noise, to_x0
from streamgen.eval.continuation import WARMUP
from streamgen.world.episodes import generate_clip, scene_for
from streamgen.world.policies import run_policy
from streamgen.world.render import World


def _latents(pipe: Pipeline, seed: int, actions: list) -> torch.Tensor:
    """Latents [1, F, C, h, w] of the world's frames under ``actions`` (after the walk's warm-up)."""
    clip = generate_clip(seed, len(actions), size=pipe.config.width, actions=actions)
    v = torch.from_numpy(clip["frames"][WARMUP:]).permute(0, 3, 1, 2).float()[None] / 127.5 - 1.0
    return pipe.vae.encode(v).float()


@torch.no_grad()
def probe(pipe: Pipeline, attn: str, walks: int, context: int, t: float, seed0: int = 900800) -> dict:
    c = pipe.config
    k = c.sampler.chunk_frames
    n_ctx = context * k
    mask = dict(attn_mode="block_causal", chunk_frames=k, sink_frames=c.cache.sink_frames,
                window_frames=c.cache.window_frames) if attn == "block_causal" else {}
    g = torch.Generator().manual_seed(0)
    sigma = torch.cat([torch.zeros(n_ctx), torch.full((k,), t / 1000.0)])[None, :, None, None, None]
    ts = sigma[:, :, 0, 0, 0] * 1000.0                                     # [1, F]
    d_pred, d_true = [], []
    for i in range(walks):
        seed = seed0 + i
        walk_acts = run_policy("explore", World(seed), np.random.default_rng([seed, 13]), WARMUP + n_ctx)
        caption = scene_for(seed)[1]
        turns = {dx: walk_acts + [{"keys": [], "mouse": [dx, 0.0]}] * k for dx in (-1.0, 1.0)}
        z = {dx: _latents(pipe, seed, a) for dx, a in turns.items()}          # [1, n_ctx + k, C, h, w]
        text = pipe.text_encoder(caption).float()
        noise = torch.randn((1, n_ctx + k) + tuple(z[-1.0].shape[2:]), generator=g)
        x = add_noise(z[-1.0], noise, sigma)                                 # context clean (sigma 0)
        x = torch.cat([z[-1.0][:, :n_ctx], x[:, n_ctx:]], 1)
        x0 = {}
        for dx, acts in turns.items():
            a = pipe.encode_actions(acts[WARMUP:], n_ctx + k).float()
            v = pipe.model(x, ts, text, action=a, **mask).float()
            x0[dx] = to_x0(x, v, sigma, compute_dtype=None)[:, n_ctx:]
        d_pred.append(float((x0[-1.0] - x0[1.0]).abs().mean()))
        d_true.append(float((z[-1.0][:, n_ctx:] - z[1.0][:, n_ctx:]).abs().mean()))
    xp, xt = float(np.mean(d_pred)), float(np.mean(d_true))
    return {"x0_lr": round(xp, 4), "true_lr": round(xt, 4), "ratio": round(xp / xt, 4) if xt else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", action="append", default=[], help="a causal model (run block-causally)")
    ap.add_argument("--teacher", action="append", default=[], help="a clip teacher (run bidirectionally)")
    ap.add_argument("--vae", default=None, help="autoencoder file for bare .safetensors models")
    ap.add_argument("--walks", type=int, default=16)
    ap.add_argument("--context", type=int, default=3, help="clean chunks before the probed one")
    ap.add_argument("--t", type=float, default=1000.0, help="noise level of the probed chunk (0-1000]")
    args = ap.parse_args(argv)
    if not args.student and not args.teacher:
        ap.error("give at least one --student or --teacher")
    if not 0 < args.t <= 1000 or args.walks < 1 or args.context < 1:
        ap.error("need 0 < --t <= 1000, --walks >= 1, --context >= 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    models = [(m, "block_causal") for m in args.student] + [(m, "bidirectional") for m in args.teacher]
    for m, attn in models:
        pipe = Pipeline.from_pretrained(m, vae_path=args.vae if m.endswith(".safetensors") else None)
        pipe.model.eval()
        row = {"model": m, "attn": attn, "t": args.t, "walks": args.walks, "context_chunks": args.context,
               **probe(pipe, attn, args.walks, args.context, args.t)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
