"""python -m streamgen.training.train --config FILE.yaml [--out DIR] [--max-steps N]

Also: ``streamgen train --config ...``, ``torchrun --nproc_per_node=N -m streamgen.training.train
--config FILE.yaml`` (gloo on CPU, FSDP2 on GPUs). ``--config`` may be a directory: every
``*.yaml`` in it runs in name order (a recipe, e.g. training/configs/default/); finished stages
(``OUT/done.json``) are skipped and an interrupted stage resumes from its last checkpoint.
Outputs in OUT: ckpt/step-*.pt (FSDP2 runs: ckpt/step-*/, torch.distributed.checkpoint
shards), metrics.jsonl, loss.png, samples/step-*.mp4, release.safetensors, done.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import torch
import yaml

from ..errors import ConfigError
from .checkpointing import latest, load_checkpoint, save_checkpoint
from .config import load_run_config, yaml_load
from .distributed import Dist, latest_sharded, load_sharded, save_sharded
from .logging import RunLogger, plot_losses, save_video


def parse_args(argv):
    p = argparse.ArgumentParser(prog="streamgen train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a run YAML, or a directory of them (a recipe)")
    p.add_argument("--out", default=None, help="output directory (default: the config's `out`)")
    p.add_argument("--max-steps", type=int, default=None, help="override the total number of steps")
    p.add_argument("--stop-after", type=int, default=None,
                   help="return after this many steps in this invocation (the run stays resumable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (YAML value), e.g. --set batch_size=4 --set data.clips=64")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def run_stage(cfg, dist: Dist, stop_after: int | None = None) -> dict:
    out = cfg.out
    done = os.path.join(out, "done.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("steps") == cfg.steps:
            if dist.main:
                print(f"[train] {cfg.stage}: already done in {out}, skipping")
            return info
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(out, exist_ok=True)
    if dist.main:
        with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    from .trainers import build_stage
    t_build = time.time()
    stage = build_stage(cfg, dist)
    ckdir = os.path.join(out, "ckpt")
    start = 0
    # FSDP2: sharded torch.distributed.checkpoint folders, every rank reads and writes its shards
    ck = latest_sharded(ckdir) if dist.fsdp else latest(ckdir)
    if ck:
        if dist.fsdp:
            start = load_sharded(ck, stage, dist)
        else:
            state = load_checkpoint(ck)
            stage.load(state)
            start = int(state["step"])
        if dist.main:
            print(f"[train] {cfg.stage}: resumed from {ck} at step {start}")

    def save(at: int):
        if dist.fsdp:
            save_sharded(ckdir, at, stage, dist)
        elif dist.main:
            save_checkpoint(ckdir, at, stage.state())
    # with FSDP2 every rank takes part in what gathers or runs the sharded model (samples, export)
    collective = dist.main or dist.fsdp
    log = RunLogger(out, cfg.steps, start, enabled=dist.main, progress=cfg.progress)
    last_save, t0, ran, step = time.time(), time.time(), 0, start
    metrics = {}
    for step in range(start, cfg.steps):
        metrics = stage.step(step)
        ran += 1
        if dist.main and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log.log(step, metrics)
        log.advance()
        timed = dist.world == 1 and (time.time() - last_save) > 60 * cfg.ckpt_minutes
        if (step + 1) % cfg.ckpt_every == 0 or timed:
            save(step + 1)
            dist.barrier()
            last_save = time.time()
        if collective and cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            _samples(stage, out, step + 1, cfg, write=dist.main)
        if stop_after is not None and ran >= stop_after and step + 1 < cfg.steps:
            log.close()
            return {"stopped_at": step + 1}
    final = max(step + 1, start) if cfg.steps else 0
    if not ck or final != start:
        save(final)
    if collective:
        if dist.main:
            stage.export(out)
        else:                                # FSDP2: gather along, write nothing
            with tempfile.TemporaryDirectory() as scratch:
                stage.export(scratch)
        _samples(stage, out, final, cfg, write=dist.main)
    if dist.main:
        info = {"stage": cfg.stage, "steps": cfg.steps, "seconds_this_run": round(time.time() - t0, 1),
                "setup_seconds": round(t0 - t_build, 1), "last_metrics": metrics}
        with open(done, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    dist.barrier()
    log.close()
    return {"steps": cfg.steps}


def _samples(stage, out, step, cfg, write: bool = True):
    if write:
        plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
    try:
        frames = stage.sample(step)
    except Exception as e:  # a sample must never kill a run
        print(f"[train] sample failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    if frames is not None and write:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        save_video(os.path.join(out, "samples", f"step-{step:08d}.mp4"), frames,
                   fps=stage.pcfg.fps)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = (sorted(glob.glob(os.path.join(args.config, "*.yaml"))) if os.path.isdir(args.config)
             else [args.config])
    if not paths:
        print(f"error: no YAML configs in {args.config}", file=sys.stderr)
        return 2
    overrides = {}
    for kv in args.set:
        if "=" not in kv:
            print(f"error: --set expects KEY=VALUE, got {kv!r}", file=sys.stderr)
            return 2
        k, v = kv.split("=", 1)
        overrides[k] = yaml_load(v)
    if args.max_steps is not None:
        overrides["steps"] = args.max_steps
    try:
        cfgs = [load_run_config(p, overrides) for p in paths]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        if len(cfgs) > 1:
            print("error: --out applies to a single config", file=sys.stderr)
            return 2
        cfgs[0].out = args.out
    dist = Dist()
    try:
        for cfg in cfgs:
            r = run_stage(cfg, dist, args.stop_after)
            if "stopped_at" in r:
                break
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
