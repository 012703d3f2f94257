"""python benchmarks/training_eval.py --run runs/default --out runs/default/eval [--which gt,teacher,student4,student2,student1,tf,df,sf]

Evaluates the trained stages of a recipe with the world's evaluation suite
(``streamgen.eval.suite.run_suite``, the same code as ``streamgen eval``):
ground truth, the bidirectional teacher (many Euler steps, streamed by a sliding window),
the shipped student at 4, 2 and 1 steps, and the ablation students (teacher forcing,
diffusion forcing, self forcing) — plus CPU generation speed. One JSON per generator.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from streamgen.codecs.autoencoder import TinyAutoencoder
from streamgen.io.checkpoint import check_and_load, config_from_metadata, read_weights
from streamgen.config import PipelineConfig
from streamgen.models.model import WanDiT
from streamgen.engine.pipeline import Pipeline
from streamgen.codecs.factory import build_text_encoder
from streamgen.training import losses as L
from streamgen.training.export import load_release
from streamgen.io.actions import encode_action


class TeacherStreamer:
    """The bidirectional teacher as a streaming generator: each chunk of 3 new frames is sampled
    with ``steps`` Euler steps (CFG) jointly with the previous ``context`` generated frames, which
    are re-noised to the current level at every step (replacement / inpainting sampling)."""

    def __init__(self, release: str, ae_path: str, steps: int = 16, guidance: float = 3.0, context: int = 9):
        sd, meta = read_weights(release)
        self.config = PipelineConfig.from_dict(config_from_metadata(meta))
        torch.manual_seed(0)
        self.model = WanDiT(self.config.model).eval()
        check_and_load(self.model, sd, release)
        self.ae = TinyAutoencoder.from_state(read_weights(ae_path)[0], self.config.model.in_channels).eval()
        self.text = build_text_encoder(self.config.text_encoder, self.config.model.text_dim, self.config.model.text_len)
        self.steps, self.guidance, self.context = steps, guidance, context
        self.ts = L.ode_timesteps(steps, self.config.sampler.shift)

    def session(self, prompt: str, seed: int):
        return _TeacherSession(self, prompt, seed)


class _TeacherSession:
    def __init__(self, gen: TeacherStreamer, prompt: str, seed: int):
        self.g, self.gen = gen, torch.Generator().manual_seed(int(seed))
        self.set_prompt(prompt)
        self.lat, self.act = [], []
        self.state = gen.ae.init_state(1)

    def set_prompt(self, text: str):
        self.emb = self.g.text(text)

    @torch.no_grad()
    def step(self, action=None) -> np.ndarray:
        g, c = self.g, self.g.config
        k = c.sampler.chunk_frames
        a = encode_action(c.model.actions, action)
        self.act += [a] * k
        ctx = torch.cat(self.lat[-g.context:], 1) if self.lat else None
        n_ctx = 0 if ctx is None else ctx.shape[1]
        acts = torch.stack(self.act[-(n_ctx + k):])[None]
        shape = (1, n_ctx + k, c.model.in_channels, c.latent_height, c.latent_width)
        x = torch.randn(shape, generator=self.gen)
        eps_ctx = torch.randn(shape, generator=self.gen)[:, :n_ctx]
        zero = torch.zeros_like(self.emb)
        for ta, tb in zip(g.ts[:-1], g.ts[1:]):
            t = torch.full(shape[:2], ta)
            if n_ctx:
                x[:, :n_ctx] = L.noise_latents(ctx, eps_ctx, t[:, :n_ctx])
            vc = g.model(x, t, self.emb, action=acts)
            vu = g.model(x, t, zero, action=acts)
            v = L.cfg_combine(vc, vu, g.guidance)
            x = L.euler_step(x, v, t, torch.full(shape[:2], tb))
        new = x[:, n_ctx:]
        self.lat.append(new)
        self.lat = self.lat[-4:]
        frames, self.state = g.ae.decode_chunk(new, self.state)
        return ((frames[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def speed(pipe, chunks: int = 24) -> dict:
    s = pipe.session("A first-person walk through a brick dungeon at sunset.", seed=0)
    s.step({"keys": ["W"]})
    t0 = time.time()
    for _ in range(chunks):
        s.step({"keys": ["W"]})
    dt = time.time() - t0
    frames = chunks * pipe.config.sampler.chunk_frames
    return {"fps": frames / dt, "ms_per_chunk": 1000 * dt / chunks, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default")
    p.add_argument("--out", default="runs/default/eval")
    p.add_argument("--which", default="gt,teacher,student4,student2,student1")
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--rollout-frames", type=int, default=96)
    p.add_argument("--drift-seconds", type=float, default=20.0)
    p.add_argument("--teacher-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from streamgen.eval.evaluators import ASSETS, Evaluators
    from streamgen.eval.suite import EvalSettings, GroundTruthGenerator, run_suite
    os.makedirs(a.out, exist_ok=True)
    ev = Evaluators.load(ASSETS)
    settings = EvalSettings(rollouts=a.rollouts, rollout_frames=a.rollout_frames, drift_seconds=(a.drift_seconds,))
    ae = os.path.join(a.run, "autoencoder", "release.safetensors")
    for name in a.which.split(","):
        t0 = time.time()
        extra = {}
        if name == "gt":
            gen = GroundTruthGenerator()
        elif name == "teacher":
            gen = TeacherStreamer(os.path.join(a.run, "teacher", "release.safetensors"), ae, steps=a.teacher_steps)
            extra["teacher_steps"] = a.teacher_steps
        elif name.startswith("student"):
            gen = load_release(os.path.join(a.run, "release-dmd"), steps=int(name[7:]))
            extra["speed"] = speed(gen)
        else:       # ablation students: tf | df | sf | ode | cd
            folder = {"tf": "release-teacher_forcing", "df": "release-diffusion_forcing", "sf": "release-dmd",
                      "ode": "release-ode_init", "cd": "release-consistency"}[name]
            gen = load_release(os.path.join(a.run, folder))
        rep = run_suite(gen, settings, ev)
        rep.update(extra, name=name, eval_seconds=round(time.time() - t0, 1))
        with open(os.path.join(a.out, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        m = rep.get("metrics", {})
        print(name, json.dumps({k: m[k].get("model") if isinstance(m.get(k), dict) else None
                                for k in ("action_following", "world_fd")}, default=str)[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
