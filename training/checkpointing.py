"""Atomic, resumable training checkpoints (torch.save -> tmp -> os.replace; torch.load(weights_only=True)).

A checkpoint holds everything a stage needs to continue identically: model(s), optimizers,
EMA, step, data position and RNG states. ``latest`` finds the newest complete one.
"""
from __future__ import annotations

import os
import re

import torch

CKPT = re.compile(r"^step-(\d+)\.pt$")


def save_checkpoint(folder: str, step: int, state: dict, keep: int = 2) -> str:
    """Write ``folder/step-XXXXXXXX.pt`` atomically and keep the ``keep`` newest."""
    os.makedirs(folder, exist_ok=True)
    state = dict(state, step=step, rng_cpu=torch.get_rng_state(), data_position=step)
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    path = os.path.join(folder, f"step-{step:08d}.pt")
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(list_checkpoints(folder))[:-keep]:
        try:
            os.remove(os.path.join(folder, f"step-{old:08d}.pt"))
        except OSError:
            pass
    return path


def list_checkpoints(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(folder) if (m := CKPT.match(n)))


def latest(folder: str) -> str | None:
    steps = list_checkpoints(folder)
    return os.path.join(folder, f"step-{steps[-1]:08d}.pt") if steps else None


def load_checkpoint(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state
