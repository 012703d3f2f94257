"""python benchmarks/training_model_card.py --eval runs/eval-v2,runs/eval-v1 [--names gt,teacher,student4,student2,student1]

Prints a markdown table of evaluation-suite reports (benchmarks/training_eval.py output) for the
model card: action following, World-FD, revisit similarity, drift, prompt switch and speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

LABEL = {"gt": "ground truth (world)", "teacher": "teacher (bidirectional, {ts} Euler steps x CFG)",
         "student4": "student, 4 steps (shipped)", "student2": "student, 2 steps", "student1": "student, 1 step",
         "sf": "self forcing (DMD)", "tf": "teacher forcing (DMD)", "df": "diffusion forcing (DMD)",
         "ode": "ODE-init student (no DMD)", "cd": "consistency-distilled student (no DMD)"}


def row(name: str, r: dict) -> str:
    m = r["metrics"]
    af = m.get("action_following", {})
    fd = m.get("world_fd", {})
    rv = m.get("revisit", {}).get("model", {})
    dr = m.get("drift", {}).get("at_seconds", {})
    ps = m.get("prompt_switch", {}).get("model", {})
    fps = r.get("speed", {}).get("fps") or r.get("generator", {}).get("gen_frames_per_second")
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    label = LABEL.get(name, name).format(ts=r.get("teacher_steps", "?"))
    drift = next(iter(dr.values()), None) if dr else None
    return (f"| {label} | {f(af.get('model', {}).get('score'))} ({f(af.get('ratio'), 2)}) | {f(fd.get('model'), 1)} | "
            f"{f(rv.get('similarity'))} | {f(drift, 1)} | {f(ps.get('frames_to_switch'), 1)} | {f(fps, 1)} |")


def table(folder: str, names: list[str]) -> str:
    """``folder`` may be a comma list of eval folders; the first one holding ``NAME.json`` wins."""
    reports = {}
    for n in names:
        for d in folder.split(","):
            p = os.path.join(d, f"{n}.json")
            if os.path.exists(p):
                with open(p, encoding="utf-8") as f:
                    reports[n] = json.load(f)
                break
    horizon = next((k for r in reports.values() for k in r["metrics"].get("drift", {}).get("at_seconds", {})), "?")
    out = ["| generator | action following (ratio to GT) | World-FD (lower better) | revisit similarity | "
           f"drift FD @{horizon} s | frames to prompt switch | frames/s (CPU) |", "|---|---|---|---|---|---|---|"]
    out += [row(n, r) for n, r in reports.items()]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--eval", default="runs/default/eval")
    p.add_argument("--names", default="gt,teacher,student4,student2,student1")
    a = p.parse_args(argv)
    print(table(a.eval, a.names.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
