"""Episodes: a world seed + a look + an action policy -> frames, actions, poses, caption.

``generate_clip(seed, frames, size=64, policy="random")`` is the in-memory data source
(no disk) and :class:`WorldSession` is the world driven step by step, with prompt switches
that cross-fade the look over ``TRANSITION`` frames (the layout and pose never jump). The
ground-truth generator of the evaluation suite is built on :class:`WorldSession`.

Frame ``i`` is rendered after applying action ``i`` (the pose of frame 0 already reflects
action 0), at frame time ``i`` (which positions the moving lanterns).
"""
from __future__ import annotations

import numpy as np

from ..io.actions import encode_actions, validate_action
from ..config import WASD, ActionSpace
from .policies import run_policy
from .render import World, render, render_mix
from .scene import Look, caption, parse_prompt, sample_look

ACTION_SPACE = ActionSpace(keys=WASD, mouse=True)
TRANSITION = 8  # frames of look cross-fade after a prompt switch


def encode(actions) -> np.ndarray:
    """Validated engine actions -> float32 [T, 6] (W, A, S, D, dx, dy)."""
    return encode_actions(ACTION_SPACE, actions).numpy().astype(np.float32).reshape(-1, ACTION_SPACE.dim)


def scene_for(seed: int) -> tuple[Look, str]:
    """The look and one caption of a seed's default scene."""
    rng = np.random.default_rng([int(seed), 11])
    look = sample_look(rng)
    return look, caption(look, rng)


def generate_clip(seed: int, frames: int, size: int = 64, policy: str = "random",
                  prompt: str | None = None, actions=None, warmup: int = 0) -> dict:
    """One clip. -> {"frames": uint8 [T,H,W,3], "actions": f32 [T,6], "pose": f32 [T,3],
    "caption": str, "look": Look, "seed": int}. ``actions`` overrides ``policy``.

    ``warmup`` > 0 runs the policy that many frames (drawn per clip in ``0..warmup``) before
    the clip starts, so clips do not all open at the spawn pose."""
    if frames <= 0:
        raise ValueError("frames must be > 0")
    skip = 0
    if warmup > 0 and actions is None:
        skip = int(np.random.default_rng([int(seed), 17]).integers(0, warmup + 1))
    world = World(seed)
    look, cap = scene_for(seed)
    if prompt is not None:
        look, cap = parse_prompt(prompt), prompt
    if actions is None:
        actions = run_policy(policy, world, np.random.default_rng([int(seed), 13]), frames + skip)
    actions = [validate_action(ACTION_SPACE, a) for a in actions[:frames + skip]]
    poses = world.poses(actions)[skip:]                           # [T, 3]
    actions = actions[skip:]
    imgs = render(world, poses, np.arange(skip, skip + len(actions)), look, size)
    return {"frames": imgs, "actions": encode(actions), "pose": poses.astype(np.float32),
            "caption": cap, "look": look, "seed": int(seed)}


class WorldSession:
    """The world as a streaming generator session: ``step(action)`` -> uint8 [chunk, H, W, 3]."""

    def __init__(self, prompt: str, seed: int, size: int = 64, chunk: int = 1, pose: str = "spawn"):
        if pose not in ("spawn", "view"):
            raise ValueError(f"pose must be 'spawn' or 'view', got {pose!r}")
        self.world = World(seed)
        self.size, self.chunk = size, int(chunk)
        self.look = parse_prompt(prompt)
        self.prev_look, self.switch_t = self.look, -10**9
        self.pose = self.world.spawn.copy() if pose == "spawn" else self.world.view_pose()
        self.t = 0
        self.poses: list[np.ndarray] = []

    def set_prompt(self, text: str) -> None:
        new = parse_prompt(text, default=self.look)
        if new != self.look:
            self.prev_look, self.look, self.switch_t = self._current_look(), new, self.t

    def _current_look(self) -> Look:
        return self.look if self.t - self.switch_t >= TRANSITION else self.prev_look

    def step(self, action: dict | None = None) -> np.ndarray:
        a = validate_action(ACTION_SPACE, action)
        poses, times = [], []
        for _ in range(self.chunk):
            self.pose = self.world.move(self.pose, a)
            poses.append(self.pose)
            times.append(self.t)
            self.t += 1
        self.poses += poses
        times = np.asarray(times)
        mix = np.clip((times - self.switch_t + 1) / TRANSITION, 0.0, 1.0)   # [chunk]
        return render_mix(self.world, np.stack(poses), times, self.prev_look, self.look, mix, self.size)


def opening_frames(prompt: str, seed: int, frames: int, size: int = 64) -> tuple[np.ndarray, WorldSession]:
    """The world's own rendering of ``prompt``'s look at seed ``seed``'s spawn, facing down a
    corridor, standing still for ``frames`` frames -> (uint8 [frames, H, W, 3], the world
    session, positioned after them: step it with the same actions to get the ground truth)."""
    ws = WorldSession(prompt, seed, size=size, chunk=1, pose="view")
    out = np.concatenate([ws.step(None) for _ in range(frames)])
    ws.chunk = 1
    return out, ws
