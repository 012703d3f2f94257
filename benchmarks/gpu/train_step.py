"""python benchmarks/gpu/train_step.py [--tiny] [--frames 21] [--steps 1] [--exit-step 3] [--budget S] [--check-ckpt]

Training throughput at real size: one self-forcing DMD iteration of the Wan2.1-T2V-1.3B
student on one GPU, random weights, bf16 autocast over fp32 master weights, activation
checkpointing on every block of the generator and the critic, AdamW. Prints one JSON document.

It uses the public training functions only (``training.rollout.rollout``, ``training.losses``):
a generator step = self-forcing rollout with grad through each chunk's exit step, the critic's
fake score and the teacher's CFG real score (no grad), DMD loss, backward, AdamW; a critic step
= rollout without grad, flow-matching loss on the detached rollout, backward, AdamW. Reported:
seconds per phase, both steps, steps/s of an iteration at Self-Forcing's ratio (1 generator
step per ``gen_every`` = 5 critic steps), and peak GPU memory. Batch 1, 21 latent frames
(7 chunks of 3, 832x480 -> 60x104 latents, 1,560 tokens per frame), global cache of 21
frames, a random 512 x 4096 text embedding, exit step fixed (default 3: the most forwards).

Two things this script does on purpose, both reported under "notes":
- the rollout cache stores K/V in bf16 and casts what it is given (under autocast K comes out
  of RMSNorm/RoPE in fp32 and V in bf16; StreamCache.write's scatter rejects the mix);
- activation checkpointing snapshots the cache's per-chunk index tensors for the recompute
  (a block recomputed in backward otherwise reads the indices of the *last* chunk).
  ``--check-ckpt`` (tiny only) compares generator gradients with and without it.

``--tiny``: the ``tiny`` preset on the CPU (what the suite's dry run runs).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

from streamgen.engine.cache import StreamCache
from streamgen.config import PipelineConfig
from streamgen.models.model import WanDiT
from streamgen.engine.sampling import FewStepSampler
from streamgen.training import losses as L
from streamgen.training.rollout import rollout

STATIC = ("write_index", "key_valid", "q_pos", "k_pos")


class CastingCache(StreamCache):
    """StreamCache whose writes cast K/V to the buffer dtype (bf16 autocast gives fp32 K, bf16 V)."""

    def write(self, layer, k_new, v_new):
        return super().write(layer, k_new.to(self.k.dtype), v_new.to(self.v.dtype))


def checkpoint_blocks(model: WanDiT):
    """Activation checkpointing per block; a streaming call's recompute sees the cache's
    per-chunk tensors of the original call (snapshotted), not the cache's current ones."""
    for blk in model.blocks:
        fwd = blk.forward

        def run(x, e, ctx, kv=None, context=None, act=None, *, fwd=fwd):
            c = ctx.cache
            if c is None or not isinstance(c, StreamCache):   # no cache, or a functional view (own statics)
                return checkpoint(fwd, x, e, ctx, kv, context, act, use_reentrant=False)
            snap = {n: getattr(c, n) for n in STATIC if hasattr(c, n)}

            def inner(x, e, kv, context, act):
                now = {n: getattr(c, n) for n in STATIC if hasattr(c, n)}
                for n, v in snap.items():
                    setattr(c, n, v)
                try:
                    return fwd(x, e, ctx, kv, context, act)
                finally:
                    for n, v in now.items():
                        setattr(c, n, v)
            return checkpoint(inner, x, e, kv, context, act, use_reentrant=False)
        blk.forward = run


def build(pcfg, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        m = WanDiT(pcfg.model)
    return m.to(dtype)


class DMDBench:
    def __init__(self, pcfg, frames, device, bf16=True, ckpt=True, exit_step=3, cache_dtype=torch.bfloat16):
        self.pcfg, self.frames, self.device = pcfg, frames, torch.device(device)
        self.bf16, self.exit_step, self.cache_dtype = bf16, exit_step, cache_dtype
        self.gen = build(pcfg, device).train()
        self.critic = build(pcfg, device, seed=1).train()
        tdt = torch.bfloat16 if bf16 else torch.float32
        self.teacher = build(pcfg, device, tdt, seed=2).eval().requires_grad_(False)
        if ckpt:
            checkpoint_blocks(self.gen)
            checkpoint_blocks(self.critic)
        self.opt_g = torch.optim.AdamW(self.gen.parameters(), lr=2e-6, betas=(0.0, 0.999), weight_decay=0.01)
        self.opt_c = torch.optim.AdamW(self.critic.parameters(), lr=4e-7, betas=(0.0, 0.999), weight_decay=0.01)
        self.timesteps = FewStepSampler(pcfg.sampler).timesteps
        m = pcfg.model
        g = torch.Generator().manual_seed(0)
        self.text = torch.randn(1, m.text_len, m.text_dim, generator=g).to(device)
        self.g = g
        self.shape = (1, frames, m.in_channels, pcfg.latent_height, pcfg.latent_width)

    def autocast(self):
        import contextlib
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def randn(self, shape):
        return torch.randn(shape, generator=self.g).to(self.device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _rollout(self, grad):
        p = self.pcfg
        cache = CastingCache(p.model, p.cache, 1, p.tokens_per_frame, p.sampler.chunk_frames, device=self.device,
                             dtype=self.cache_dtype)
        with torch.set_grad_enabled(grad), self.autocast():
            cache.cross_kv = self.gen.cross_kv(self.text)
            x = rollout(self.gen, cache, self.timesteps, self.randn(self.shape), self.randn, self.exit_step,
                        context="self", context_noise=p.sampler.context_noise, grad=grad)
        return x.float()

    def _update(self, model, opt, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()

    def _critic_update(self, x):
        t = L.sample_timesteps(1, self.frames, shift=5.0, per="clip", generator=self.g).to(self.device)
        eps = self.randn(x.shape)
        with self.autocast():
            v = self.critic(L.noise_latents(x.detach(), eps, t), t, self.text)
            closs = L.critic_loss(v, x.detach(), eps)
        self._update(self.critic, self.opt_c, closs)
        return float(closs.detach())

    def generator_step(self) -> dict:
        ph, t0 = {}, time.perf_counter()
        x = self._rollout(grad=True)
        self.sync()
        ph["rollout_grad_s"] = time.perf_counter() - t0
        t = L.sample_timesteps(1, self.frames, shift=5.0, per="clip", generator=self.g).to(self.device)
        with torch.no_grad(), self.autocast():
            x_t = L.noise_latents(x.detach(), self.randn(x.shape), t)
            fake = L.x0_from_flow(x_t, self.critic(x_t, t, self.text).float(), t)
            cond = L.x0_from_flow(x_t, self.teacher(x_t, t, self.text).float(), t)
            unc = L.x0_from_flow(x_t, self.teacher(x_t, t, torch.zeros_like(self.text)).float(), t)
            grad = L.dmd_gradient(x.detach(), fake, L.cfg_combine(cond, unc, 3.0))
        self.sync()
        ph["scores_s"] = time.perf_counter() - t0 - sum(ph.values())
        loss = L.dmd_loss(x, grad)
        self._update(self.gen, self.opt_g, loss)
        self.sync()
        ph["generator_backward_adamw_s"] = time.perf_counter() - t0 - sum(ph.values())
        closs = self._critic_update(x)
        self.sync()
        ph["critic_fwd_bwd_adamw_s"] = time.perf_counter() - t0 - sum(ph.values())
        ph["total_s"] = time.perf_counter() - t0
        return {k: round(v, 4) for k, v in ph.items()} | {"dmd_loss": float(loss), "critic_loss": closs}

    def critic_step(self) -> dict:
        t0 = time.perf_counter()
        x = self._rollout(grad=False)
        self.sync()
        r = time.perf_counter() - t0
        closs = self._critic_update(x)
        self.sync()
        return {"rollout_nograd_s": round(r, 4), "critic_fwd_bwd_adamw_s": round(time.perf_counter() - t0 - r, 4),
                "total_s": round(time.perf_counter() - t0, 4), "critic_loss": closs}


def check_ckpt(pcfg, frames) -> float:
    """Relative difference of generator gradients with vs without checkpointing (tiny, fp32)."""
    grads = []
    for ckpt in (False, True):
        b = DMDBench(pcfg, frames, "cpu", bf16=False, ckpt=ckpt, exit_step=1, cache_dtype=torch.float32)
        x = b._rollout(grad=True)
        x.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.gen.parameters() if p.grad is not None]))
    return float((grads[0] - grads[1]).norm() / grads[0].norm().clamp_min(1e-30))


def summarize(doc: dict, gpu: bool):
    """Derived figures: best timed step of each kind (the warm-up step if none was timed)."""
    gens, crits = doc["generator_steps"], doc["critic_steps"]
    gen_s = min((g["total_s"] for g in gens), default=doc["warmup_generator_step"]["total_s"])
    crit_s = min((c["total_s"] for c in crits), default=None)
    doc["generator_step_s"], doc["critic_step_s"] = gen_s, crit_s
    doc["timed_after_warmup"] = bool(gens)
    if crit_s is not None:
        it = (gen_s + 4 * crit_s) / 5
        doc["iteration_s_gen_every_5"] = round(it, 4)
        doc["steps_per_s_gen_every_5"] = round(1 / it, 4)
    doc["generator_steps_per_s"] = round(1 / gen_s, 4)
    if gpu:
        doc["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        doc["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    else:
        import resource
        doc["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (always on without a GPU)")
    ap.add_argument("--frames", type=int, default=None, help="latent frames per rollout (default 21; tiny 9)")
    ap.add_argument("--steps", type=int, default=1, help="timed generator steps and critic steps (after a warm-up)")
    ap.add_argument("--exit-step", type=int, default=3, help="exit step of the rollout (0..3)")
    ap.add_argument("--budget", type=float, default=None, help="no timed step starts after S seconds")
    ap.add_argument("--check-ckpt", action="store_true", help="tiny: gradients with vs without checkpointing")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    t_start = time.time()
    gpu = torch.cuda.is_available() and not args.tiny
    device = "cuda" if gpu else "cpu"
    pcfg = PipelineConfig.from_name("tiny" if not gpu else "wan2.1-t2v-1.3b")
    frames = args.frames or (9 if not gpu else 21)
    notes = ["K/V cached in bf16 with a cast in write(): under bf16 autocast StreamCache.write's scatter fails "
             "for both fp32 and bf16 caches (K is fp32 after RMSNorm/RoPE, V bf16) -- so DMDStage with "
             "precision bf16 (the GPU default) cannot run its rollout as written",
             "checkpointing snapshots the cache's per-chunk tensors (write_index, key_valid, q_pos, k_pos, "
             "functional) for the recompute; trainers.enable_grad_checkpointing does not, and its recomputed "
             "blocks read the last chunk's indices (generator gradients differ by ~1-2% at tiny size)"]
    doc = dict(tool="train_step", command="python benchmarks/gpu/train_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv), device=torch.cuda.get_device_name() if gpu else "cpu",
        torch=torch.__version__, python=platform.python_version(), preset="tiny" if not gpu else "wan2.1-t2v-1.3b",
        frames=frames, batch=1, exit_step=args.exit_step, precision="bf16 autocast, fp32 master weights",
        grad_checkpointing="every block (generator, critic)", notes=notes)
    if args.check_ckpt:
        doc["ckpt_grad_rel_diff"] = check_ckpt(PipelineConfig.from_name("tiny"), 9)
    t0 = time.time()
    b = DMDBench(pcfg, frames, device, bf16=True, ckpt=True, exit_step=args.exit_step)
    if gpu:
        torch.cuda.synchronize()
    doc["build_s"] = round(time.time() - t0, 2)
    doc["params_per_model"] = sum(p.numel() for p in b.gen.parameters())
    try:
        doc["warmup_generator_step"] = b.generator_step()
    except torch.cuda.OutOfMemoryError as e:       # keep the window useful: retry on 3 chunks
        doc["out_of_memory"] = {"frames": frames, "error": str(e)[:300]}
        b.opt_g.zero_grad(set_to_none=True), b.opt_c.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        frames = b.frames = doc["frames"] = 9
        b.shape = b.shape[:1] + (frames,) + b.shape[2:]
        doc["warmup_generator_step"] = b.generator_step()
    gens, crits = [], []
    doc["generator_steps"], doc["critic_steps"] = gens, crits
    summarize(doc, gpu)
    print(json.dumps(dict(doc, status="running")), flush=True)     # a killed run keeps the warm-up figure
    for _ in range(args.steps):
        if args.budget is not None and time.time() - t_start > args.budget:
            break
        gens.append(b.generator_step())
        if args.budget is not None and time.time() - t_start > args.budget:
            break
        crits.append(b.critic_step())
    summarize(doc, gpu)
    doc["wall_s"] = round(time.time() - t_start, 2)
    doc["status"] = "ok"
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
