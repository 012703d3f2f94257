"""Action policies: scripted and random drivers that emit engine-schema actions per frame.

Every policy is ``fn(world, rng, frames) -> list[action]`` with actions
``{"keys": [...], "mouse": [dx, dy]}`` (keys from W/A/S/D, mouse in [-1, 1], dy always 0).

* ``random``   piecewise-constant random key combinations and turns (segments of 3-12 frames);
               the inverse-dynamics evaluator is trained on this, every action is frequent.
* ``human``    smooth, human-like: mostly walking forward, mouse dx from a low-pass filtered
               random process, slows and turns away from walls, occasional strafes and stops.
* ``revisit``  returns to earlier poses: 360-degree turns and go-forward/turn/come-back loops
               whose lengths are multiples of 48 frames (the lanterns' common period).
* ``scripted`` a fixed tour: walk, turn 90 degrees, look around; same every time.
* ``explore``  a walker that shows the maze: it follows corridor centre lines cell by cell,
               turns at junctions (and at dead ends), looks down side corridors, strafes and
               backs up now and then. This is what the default world model is trained on.
* ``mixed``    per clip, one of the above (random 40 %, human 40 %, revisit 20 %).
* ``explore-jitter`` explore with 3-6 frame distractor actions (stop, turn, strafe, back up)
               about every 9 frames, so the future depends on the keys, not on the motion so far.
* ``explore-mix`` per clip: explore 75 %, human 10 %, random 15 % (release 3's first teacher stage).
* ``world-model`` per clip: explore-jitter 70 %, human 10 %, random 20 % (release 3's recipe).
"""
from __future__ import annotations

import math

import numpy as np

from .render import FORWARD, TURN_DEG, World

POLICIES = ("random", "human", "revisit", "scripted", "explore", "explore-jitter", "mixed", "explore-mix",
            "world-model")
TURN_360 = int(round(360 / TURN_DEG))   # frames of a full turn at |dx| = 1 (48)


def act(keys=(), dx: float = 0.0) -> dict:
    return {"keys": list(keys), "mouse": [round(float(dx), 4), 0.0]}


def random_policy(world: World, rng: np.random.Generator, frames: int) -> list[dict]:
    out: list[dict] = []
    while len(out) < frames:
        n = int(rng.integers(3, 13))
        keys = [k for k, p in (("W", 0.45), ("A", 0.2), ("S", 0.2), ("D", 0.2)) if rng.random() < p]
        r = rng.random()
        dx = 0.0 if r < 0.4 else float(rng.choice([-1.0, -0.5, 0.5, 1.0])) if r < 0.8 else float(rng.uniform(-1, 1))
        out += [act(keys, dx)] * n
    return out[:frames]


def _clearance(world: World, pose, dist: float = 0.6) -> bool:
    x, y, yaw = pose
    return not world.blocked(x + dist * math.cos(yaw), y + dist * math.sin(yaw))


def human_policy(world: World, rng: np.random.Generator, frames: int) -> list[dict]:
    out: list[dict] = []
    pose = world.spawn.copy()
    dx, target, hold, mode = 0.0, 0.0, 0, "walk"
    for _ in range(frames):
        if hold <= 0:
            r = rng.random()
            mode = "walk" if r < 0.7 else "strafe" if r < 0.82 else "look" if r < 0.94 else "stop"
            target = float(rng.normal(0, 0.35))
            hold = int(rng.integers(8, 32))
        hold -= 1
        if not _clearance(world, pose) and mode in ("walk", "strafe"):
            target = math.copysign(0.9, target if target else 1.0)     # turn away from the wall
        dx = 0.8 * dx + 0.2 * target + float(rng.normal(0, 0.03))    # low-pass mouse
        dx = float(np.clip(dx, -1, 1))
        keys = {"walk": ["W"], "strafe": ["W", "A" if target < 0 else "D"], "look": [], "stop": []}[mode]
        if mode == "walk" and not _clearance(world, pose, 0.35):
            keys = []
        a = act(keys, dx)
        out.append(a)
        pose = world.move(pose, a)
    return out


def revisit_script(kind: str = "turn", dx: float = 1.0, forward: int = 24) -> list[dict]:
    """A returning action script. ``turn``: 360 degrees; ``back``: go, turn 180, return, turn 180."""
    turn = int(round(TURN_360 / abs(dx)))
    if kind == "turn":
        return [act((), dx)] * turn
    if kind == "back":
        half = [act((), dx)] * (turn // 2)
        return [act(["W"])] * forward + half + [act(["W"])] * forward + half
    raise ValueError(f"unknown revisit kind {kind!r}")


def free_run(world: World, pose) -> float:
    """Free distance (cells) straight ahead of a pose, with the collision radius."""
    x, y, yaw = pose
    d = 0.0
    while d < 20 and not world.blocked(x + (d + 0.05) * math.cos(yaw), y + (d + 0.05) * math.sin(yaw)):
        d += 0.05
    return d


def revisit_policy(world: World, rng: np.random.Generator, frames: int) -> list[dict]:
    out: list[dict] = []
    pose = world.spawn.copy()
    while len(out) < frames:
        run = free_run(world, pose)
        fwd = int(min(24, (run - 0.1) / FORWARD))
        seg = revisit_script("back", 1.0, fwd) if fwd >= 6 and rng.random() < 0.6 else \
            revisit_script("turn", float(rng.choice([-1.0, 1.0])))
        seg += human_policy(world_at(world, pose), rng, int(rng.integers(6, 20)))
        for a in seg:
            pose = world.move(pose, a)
        out += seg
    return out[:frames]


def world_at(world: World, pose) -> World:
    """A shallow view of ``world`` whose spawn is ``pose`` (for chaining policies)."""
    w = object.__new__(World)
    w.__dict__.update(world.__dict__)
    w.spawn = np.asarray(pose, np.float64).copy()
    return w


def scripted_policy(world: World, rng: np.random.Generator, frames: int) -> list[dict]:
    tour = [act(["W"])] * 24 + [act((), 1.0)] * 12 + [act(["W"])] * 16 + [act((), -0.5)] * 24 \
        + [act(["W", "D"])] * 8 + [act((), 0.5)] * 24 + [act(["S"])] * 8
    return (tour * (frames // len(tour) + 1))[:frames]


_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))     # (dx, dy) in grid cells; yaw 0, +90, 180, -90 deg


def _wrap(a: float) -> float:
    return math.atan2(math.sin(a), math.cos(a))


def _free(world: World, cx: int, cy: int) -> bool:
    g = world.grid
    return 0 <= cy < g.shape[0] and 0 <= cx < g.shape[1] and g[cy, cx] == 0


def _turn_to(yaw: float, target: float, walk: bool) -> dict:
    """One frame of turning toward ``target`` (walking forward when nearly aligned)."""
    d = _wrap(target - yaw)
    dx = float(np.clip(d / math.radians(TURN_DEG), -1.0, 1.0))
    return act(["W"] if walk and abs(d) < math.radians(35) else [], dx)


_DISTRACTORS = (((), 0.0), ((), -1.0), ((), 1.0), ((), -0.5), ((), 0.5), (("A",), 0.0), (("D",), 0.0),
                (("S",), 0.0), (("W",), -0.7), (("W",), 0.7), (("W", "A"), 0.0), (("W", "D"), 0.0))


def explore_policy(world: World, rng: np.random.Generator, frames: int, jitter: float = 0.0) -> list[dict]:
    """Walk the maze along corridor centre lines; see the module docstring.

    ``jitter``: probability per 3 frames of a 3-6 frame "distractor" action (stop, turn,
    strafe, back up, curve) after which the walk re-aims at its next cell. It makes the next
    frames depend on the keys rather than on the motion already seen (world-model data)."""
    out: list[dict] = []
    pose = world.spawn.copy()
    heading = int(round(pose[2] / (math.pi / 2))) % 4
    guard = 0
    while len(out) < frames and guard < 10 * frames:
        guard += 1
        cx, cy = int(math.floor(pose[0])), int(math.floor(pose[1]))
        opts = [i for i, (dx, dy) in enumerate(_DIRS) if _free(world, cx + dx, cy + dy)]
        if not opts:
            out.append(act((), 1.0))
            pose = world.move(pose, out[-1])
            continue
        back = (heading + 2) % 4
        fwd = [i for i in opts if i != back] or opts
        side = [i for i in fwd if i != heading]
        r = rng.random()
        seg: list[dict] = []
        if side and r < 0.15:                       # look down a side corridor, then back
            look = _DIRS[side[int(rng.integers(len(side)))]]
            tgt = math.atan2(look[1], look[0])
            seg = _turn_seq(pose[2], tgt, walk=False) + [act()] * int(rng.integers(2, 8))
            seg += _turn_seq(tgt, pose[2], walk=False)
        elif r < 0.22:                              # strafe a little
            seg = [act(["A" if rng.random() < 0.5 else "D"])] * int(rng.integers(4, 10))
        elif r < 0.27:                              # back up
            seg = [act(["S"])] * int(rng.integers(4, 10))
        for a in seg:
            out.append(a)
            pose = world.move(pose, a)
        if heading in fwd and (len(fwd) == 1 or rng.random() < 0.55):
            new = heading
        else:
            new = fwd[int(rng.integers(len(fwd)))]
        heading = new
        tx, ty = cx + _DIRS[new][0] + 0.5, cy + _DIRS[new][1] + 0.5
        for _ in range(40):                         # turn toward the next cell centre and walk there
            if len(out) >= frames:
                break
            # re-centre on the perpendicular axis, aim at the target centre
            tgt = math.atan2(ty - pose[1], tx - pose[0])
            if math.hypot(tx - pose[0], ty - pose[1]) < 0.12:
                break
            if jitter and rng.random() < jitter / 3:
                keys, dx = _DISTRACTORS[int(rng.integers(len(_DISTRACTORS)))]
                for _ in range(int(rng.integers(3, 7))):
                    out.append(act(keys, dx))
                    pose = world.move(pose, out[-1])
                continue
            a = _turn_to(pose[2], tgt, walk=True)
            npose = world.move(pose, a)
            out.append(a)
            if a["keys"] and np.allclose(npose[:2], pose[:2]):   # stuck on a corner: turn only
                out[-1] = act((), a["mouse"][0] or 1.0)
                npose = world.move(pose, out[-1])
            pose = npose
    while len(out) < frames:
        out.append(act())
    return out[:frames]


def _turn_seq(yaw: float, target: float, walk: bool) -> list[dict]:
    seq = []
    for _ in range(48):
        if abs(_wrap(target - yaw)) < 1e-3:
            break
        a = _turn_to(yaw, target, walk)
        seq.append(a)
        yaw = _wrap(yaw + math.radians(TURN_DEG) * a["mouse"][0])
    return seq


def run_policy(name: str, world: World, rng: np.random.Generator, frames: int) -> list[dict]:
    if name == "mixed":
        name = ("random", "human", "revisit")[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
    elif name == "explore-mix":
        name = ("explore", "human", "random")[int(rng.choice(3, p=[0.75, 0.1, 0.15]))]
    elif name == "world-model":
        name = ("explore-jitter", "human", "random")[int(rng.choice(3, p=[0.7, 0.1, 0.2]))]
    if name == "explore-jitter":
        return explore_policy(world, rng, frames, jitter=0.35)
    fn = {"random": random_policy, "human": human_policy, "revisit": revisit_policy,
          "scripted": scripted_policy, "explore": explore_policy}.get(name)
    if fn is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return fn(world, rng, frames)
