"""Training progress: tqdm bar (loss, steps/s), JSONL metrics, loss plot PNG, sample MP4s,
and TensorBoard scalars when tensorboard is installed. Only rank 0 writes."""
from __future__ import annotations

import json
import os
import time


class RunLogger:
    def __init__(self, out: str, total: int, start: int, enabled: bool = True, progress: str = "bar"):
        self.out, self.enabled = out, enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.t0, self.s0, self.bar, self.tb = time.time(), start, None, None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        if progress == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=2.0)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except Exception:
            self.tb = None

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        rate = (step + 1 - self.s0) / max(time.time() - self.t0, 1e-9)
        rec = {"step": step, "time": round(time.time(), 3), "steps_per_s": round(rate, 4),
               **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in list(metrics.items())[:3]} | {"it/s": f"{rate:.2f}"})

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, png_path: str) -> bool:
    """Every ``*loss*`` series of a metrics JSONL against step (log scale) -> PNG."""
    rows = read_metrics(metrics_path)
    keys = sorted({k for r in rows for k in r if "loss" in k})
    if not rows or not keys:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] > 0]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


def save_video(path: str, frames, fps: int = 16):
    """uint8 [T, H, W, 3] -> MP4 (or GIF when the path ends in .gif)."""
    import numpy as np
    frames = np.asarray(frames)
    if path.endswith(".gif"):
        from PIL import Image
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        return
    from ..io.video import write_mp4
    write_mp4(path, frames, fps=fps)
