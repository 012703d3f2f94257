"""The evaluators: three tiny torch nets trained on the world (no downloaded weights).

* :class:`InverseDynamics`  two consecutive frames -> effective keys (W, A, S, D logits) and
  turn class (left / none / right) of the motion between them (:func:`effective_targets`:
  the commanded action as the world carried it out, walls included).
* :class:`VideoEncoder`     an 8-frame clip -> 32-d feature (World-FD space); trained with heads
  for theme, time of day, weather, "is this clip temporally shuffled" and the clip's mean motion.
* :class:`ThemeClassifier`  one frame -> theme logits.

All take uint8 frames at 64x64 ([..., 64, 64, 3]) and average-pool them to 32x32 inside.
Weights are ``streamgen/eval/assets/{idm,encoder,theme}.safetensors`` (float16) with their
held-out accuracies in ``evaluators.json``; they are written by
``python -m streamgen.eval.train_evaluators``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from ..world.render import FORWARD, STRAFE, TURN_DEG

ASSETS = Path(__file__).parent / "assets"
EVAL_SIZE = 64
CLIP = 8              # frames per encoder clip
TURN_THRESHOLD = 0.2  # |dx| above this is a turn


def to_input(frames) -> torch.Tensor:
    """uint8 [..., 64, 64, 3] (numpy or torch) -> float [..., 3, 32, 32] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames)) if not torch.is_tensor(frames) else frames
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float() / 127.5 - 1.0   # [B, 3, 64, 64]
    x = F.avg_pool2d(x, 2)                                                        # [B, 3, 32, 32]
    return x.reshape(*lead, 3, 32, 32)


def effective_targets(poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World poses [..., N, 3] (x, y, yaw) -> the motion between consecutive frames as
    effective keys [..., N-1, 4] (W, A, S, D) and turn class [..., N-1] (0 left, 1 none, 2 right).

    This is the commanded action as the world carried it out: a key whose move a wall blocked
    is not pressed here (the frames cannot show it). The displacement of frame i-1 -> i is read
    in frame i's heading (the world turns first, then moves); a key counts when at least 30 %
    of its full step happened."""
    p = np.asarray(poses, np.float64)
    d = p[..., 1:, :2] - p[..., :-1, :2]
    c, s = np.cos(p[..., 1:, 2]), np.sin(p[..., 1:, 2])
    fwd = d[..., 0] * c + d[..., 1] * s
    side = -d[..., 0] * s + d[..., 1] * c
    keys = np.stack([fwd > 0.3 * FORWARD, side < -0.3 * STRAFE, fwd < -0.3 * FORWARD, side > 0.3 * STRAFE], -1)
    dyaw = np.degrees(np.angle(np.exp(1j * (p[..., 1:, 2] - p[..., :-1, 2])))) / TURN_DEG   # effective mouse dx
    turn = np.where(dyaw < -TURN_THRESHOLD, 0, np.where(dyaw > TURN_THRESHOLD, 2, 1)).astype(np.int64)
    return keys.astype(np.float32), turn


class InverseDynamics(nn.Module):
    def __init__(self, ch: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(9, ch, 4, 2, 1), nn.GroupNorm(8, ch), nn.ReLU(),                  # [ch, 16, 16]
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.GroupNorm(8, 2 * ch), nn.ReLU(),         # [2ch, 8, 8]
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1), nn.GroupNorm(8, 2 * ch), nn.ReLU(),     # [2ch, 4, 4]
            nn.Flatten(), nn.Linear(2 * ch * 16, 128), nn.ReLU(), nn.Linear(128, 7))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b: [B, 3, 32, 32] consecutive frames -> key logits [B, 4], turn logits [B, 3]."""
        out = self.net(torch.cat([a, b, 4.0 * (b - a)], 1))
        return out[:, :4], out[:, 4:]

    @torch.no_grad()
    def predict(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 64, 64, 3] -> keys bool [N-1, 4], turn int [N-1] for each consecutive pair."""
        x = to_input(frames)
        keys, turns = [], []
        for i in range(0, x.shape[0] - 1, 512):
            a, b = x[i:i + 512], x[i + 1:i + 513]
            n = min(a.shape[0], b.shape[0])
            k, t = self(a[:n], b[:n])
            keys.append(k > 0)
            turns.append(t.argmax(-1))
        return torch.cat(keys).numpy(), torch.cat(turns).numpy()


class VideoEncoder(nn.Module):
    HEADS = {"theme": 6, "time": 4, "weather": 3, "order": 2, "motion": 6}

    def __init__(self, ch: int = 24, feat: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(3, ch, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.GroupNorm(6, ch), nn.ReLU(),   # [ch, 8, 16, 16]
            nn.Conv3d(ch, 2 * ch, (3, 4, 4), (2, 2, 2), (1, 1, 1)), nn.GroupNorm(6, 2 * ch), nn.ReLU(),
            nn.Conv3d(2 * ch, 2 * ch, (3, 4, 4), (2, 2, 2), (1, 1, 1)), nn.GroupNorm(6, 2 * ch), nn.ReLU())
        # -> [2ch, 2, 4, 4]
        self.proj = nn.Linear(2 * ch * 2 * 16, feat)
        self.heads = nn.ModuleDict({k: nn.Linear(feat, n) for k, n in self.HEADS.items()})

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """clips [B, 8, 3, 32, 32] -> features [B, feat], head outputs."""
        h = self.net(clips.transpose(1, 2)).flatten(1)
        f = self.proj(h)
        return f, {k: m(F.relu(f)) for k, m in self.heads.items()}

    @torch.no_grad()
    def features(self, frames, stride: int = 4) -> np.ndarray:
        """uint8 [N, 64, 64, 3] -> features [M, feat] of the 8-frame windows every ``stride`` frames."""
        x = to_input(frames)
        starts = list(range(0, x.shape[0] - CLIP + 1, stride))
        if not starts:
            return np.zeros((0, self.proj.out_features), np.float32)
        out = [self(torch.stack([x[s:s + CLIP] for s in starts[i:i + 256]]))[0] for i in range(0, len(starts), 256)]
        return torch.cat(out).numpy().astype(np.float64)


class ThemeClassifier(nn.Module):
    def __init__(self, ch: int = 16, n: int = 6):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * ch * 16, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, 32, 32] -> logits [B, n]"""
        return self.net(x)

    @torch.no_grad()
    def probs(self, frames) -> np.ndarray:
        """uint8 [N, 64, 64, 3] -> probabilities [N, n]"""
        x = to_input(frames)
        return torch.cat([self(x[i:i + 1024]).softmax(-1) for i in range(0, x.shape[0], 1024)]).numpy()


NETS = {"idm": InverseDynamics, "encoder": VideoEncoder, "theme": ThemeClassifier}


def save(net: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}, str(path))


class Evaluators:
    """The three trained nets and their held-out accuracies."""

    def __init__(self, idm: InverseDynamics, encoder: VideoEncoder, theme: ThemeClassifier, info: dict):
        self.idm, self.encoder, self.theme, self.info = idm, encoder, theme, info

    @classmethod
    def load(cls, folder: str | Path = ASSETS) -> "Evaluators":
        from safetensors.torch import load_file

        folder = Path(folder)
        nets = {}
        for name, klass in NETS.items():
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"evaluator weights {path} are missing; run python -m streamgen.eval.train_evaluators")
            net = klass()
            try:
                state = {k: v.float() for k, v in load_file(str(path)).items()}
                net.load_state_dict(state)
            except (RuntimeError, OSError) as e:
                raise CheckpointError(f"cannot load evaluator {path}: {e}") from None
            nets[name] = net.eval()
        info_path = folder / "evaluators.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        return cls(nets["idm"], nets["encoder"], nets["theme"], info)
