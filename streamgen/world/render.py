"""The world: a seeded grid-map maze with moving lanterns, and its vectorised numpy raycaster.

Geometry (all from the seed, never from text):
  * a maze on a ``2n+1`` square grid (recursive backtracker, extra walls knocked out for loops
    and a few open rooms); cell value 0 = free, 1..3 = wall material variant;
  * ``n_sprites`` floating lanterns, each moving back and forth along a straight free run with
    period 24 or 48 frames (so every revisit script of a multiple of 48 frames sees them at
    the same place again) and a vertical bob;
  * a spawn pose (x, y, yaw) in cell units / radians.

Movement (per video frame, from the engine action schema): W/S move forward/back by
``FORWARD`` cells, A/D strafe left/right by ``STRAFE`` cells, mouse dx turns by
``TURN_DEG * dx`` degrees (positive = right / clockwise on screen), mouse dy is accepted and
ignored (the world has no pitch). Collisions keep the camera ``RADIUS`` away from walls.

Rendering: column raycasting (DDA) vectorised over all columns of all frames of a batch, then
per-pixel texture lookup for walls, floor and ceiling/sky, depth-tested sprite discs, time of
day lighting and exponential fog. :func:`render` takes N poses and N frame times and returns
uint8 [N, H, W, 3].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .scene import TEX, THEMES, TIME_LIGHT, WEATHER_FOG, Look, theme_assets

FOV_DEG = 66.0
TURN_DEG = 7.5        # degrees of yaw per frame at mouse dx = 1 (360 deg = 48 frames)
FORWARD = 0.10        # cells per frame for W / S
STRAFE = 0.07         # cells per frame for A / D
RADIUS = 0.2          # collision radius in cells
SPRITE_PERIODS = (24, 48)


@dataclass
class Sprite:
    a: np.ndarray        # [2] one end of the patrol (x, y)
    b: np.ndarray        # [2] other end
    period: int          # frames
    phase: float         # radians

    def position(self, t: np.ndarray) -> np.ndarray:
        """t: [N] frame times -> [N, 3] (x, y, z) with z the bob height offset."""
        w = 2 * math.pi * np.asarray(t, np.float64) / self.period + self.phase
        s = (0.5 - 0.5 * np.cos(w))[:, None]
        xy = self.a[None] + (self.b - self.a)[None] * s
        z = 0.12 * np.sin(2 * w)[:, None]
        return np.concatenate([xy, z], axis=1)


class World:
    """Layout, moving objects and spawn pose of one seed. Deterministic."""

    def __init__(self, seed: int, cells: int = 8, n_sprites: int = 4):
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 7])
        self.grid = _maze(rng, cells)                              # [G, G] int8
        free = np.argwhere(self.grid == 0)                         # [F, 2] (row=y, col=x)
        self.sprites = [_sprite(rng, self.grid, free) for _ in range(n_sprites)]
        y, x = free[rng.integers(len(free))]
        self.spawn = np.array([x + 0.5, y + 0.5, rng.uniform(-math.pi, math.pi)], np.float64)

    @property
    def size(self) -> int:
        return self.grid.shape[0]

    def blocked(self, x: float, y: float) -> bool:
        g = self.grid
        for dx in (-RADIUS, RADIUS):
            for dy in (-RADIUS, RADIUS):
                if g[int(math.floor(y + dy)), int(math.floor(x + dx))]:
                    return True
        return False

    def move(self, pose, action: dict) -> np.ndarray:
        """Next pose [3] after one frame of a validated action (keys + mouse)."""
        x, y, yaw = (float(v) for v in pose)
        keys = action.get("keys", ())
        yaw = yaw + math.radians(TURN_DEG) * float(action.get("mouse", (0.0, 0.0))[0])
        yaw = math.atan2(math.sin(yaw), math.cos(yaw))
        fwd = FORWARD * ((1.0 if "W" in keys else 0.0) - (1.0 if "S" in keys else 0.0))
        side = STRAFE * ((1.0 if "D" in keys else 0.0) - (1.0 if "A" in keys else 0.0))
        c, s = math.cos(yaw), math.sin(yaw)
        # right-hand vector in screen terms is (-sin, cos) for this y-down grid
        dx, dy = fwd * c - side * s, fwd * s + side * c
        if not self.blocked(x + dx, y):
            x += dx
        if not self.blocked(x, y + dy):
            y += dy
        return np.array([x, y, yaw], np.float64)

    def view_pose(self) -> np.ndarray:
        """The spawn position, facing along the axis with the longest free run (a corridor view)."""
        x, y, _ = self.spawn
        best, yaw = -1.0, 0.0
        for k in range(4):
            a = k * math.pi / 2
            d = 0.0
            while d < 20 and not self.blocked(x + (d + 0.05) * math.cos(a), y + (d + 0.05) * math.sin(a)):
                d += 0.05
            if d > best:
                best, yaw = d, a
        return np.array([x, y, math.atan2(math.sin(yaw), math.cos(yaw))], np.float64)

    def poses(self, actions, start=None) -> np.ndarray:
        """Pose of every frame: frame i is rendered after applying action i. -> [N, 3]"""
        p = self.spawn if start is None else np.asarray(start, np.float64)
        out = np.zeros((len(actions), 3), np.float64)
        for i, a in enumerate(actions):
            p = self.move(p, a)
            out[i] = p
        return out


def _maze(rng, n: int) -> np.ndarray:
    g = np.ones((2 * n + 1, 2 * n + 1), np.int8)
    seen = np.zeros((n, n), bool)
    stack = [(int(rng.integers(n)), int(rng.integers(n)))]
    seen[stack[0]] = True
    g[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = 0
    while stack:
        r, c = stack[-1]
        nbrs = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                if 0 <= r + dr < n and 0 <= c + dc < n and not seen[r + dr, c + dc]]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[rng.integers(len(nbrs))]
        seen[nr, nc] = True
        g[r + nr + 1, c + nc + 1] = 0
        g[2 * nr + 1, 2 * nc + 1] = 0
        stack.append((nr, nc))
    # knock out extra interior walls (loops) and open two small rooms
    inner = [(r, c) for r in range(1, 2 * n) for c in range(1, 2 * n) if g[r, c] and (r + c) % 2 == 1]
    for i in rng.permutation(len(inner))[: len(inner) // 5]:
        g[inner[i]] = 0
    for _ in range(2):
        r, c = rng.integers(1, 2 * n - 2, size=2)
        g[r:r + 3, c:c + 3] = 0
    g[0, :] = g[-1, :] = g[:, 0] = g[:, -1] = 1
    walls = g > 0
    g[walls] = rng.integers(1, 4, size=int(walls.sum())).astype(np.int8)
    return g


def _sprite(rng, grid, free) -> Sprite:
    best = None
    for _ in range(12):
        y, x = free[rng.integers(len(free))]
        for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1)):
            k = 0
            while grid[y + dy * (k + 1), x + dx * (k + 1)] == 0 and k < 5:
                k += 1
            if best is None or k > best[0]:
                best = (k, x, y, dx, dy)
    k, x, y, dx, dy = best
    a = np.array([x + 0.5, y + 0.5])
    b = a + np.array([dx, dy]) * max(k, 0)
    return Sprite(a, b, int(SPRITE_PERIODS[rng.integers(2)]), float(rng.uniform(0, 2 * math.pi)))


# ----------------------------------------------------------------------------- renderer
_SPRITE_RADIUS = 0.22   # world units


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# The three helpers below are pure functions of small keys (theme, time, frame size), memoised
# with lru_cache and returning read-only values: no module dict is written while rendering.
@lru_cache(maxsize=16)
def _assets(theme: str) -> Mapping[str, Any]:
    a = theme_assets(theme)
    a["flat"] = _frozen(a["atlas"].reshape(-1, 3).copy())              # [5*TEX*TEX, 3]
    a["atlas"] = _frozen(a["atlas"])
    return MappingProxyType(a)


def _cast(grid: np.ndarray, px, py, rdx, rdy):
    """DDA over all rays at once. All inputs [R]. -> perp dist, side (0: x-face), material, wall u."""
    mx, my = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    with np.errstate(divide="ignore"):
        ddx = np.where(rdx == 0, 1e30, np.abs(1.0 / rdx))
        ddy = np.where(rdy == 0, 1e30, np.abs(1.0 / rdy))
    sx, sy = np.where(rdx < 0, -1, 1), np.where(rdy < 0, -1, 1)
    sdx = np.where(rdx < 0, (px - mx) * ddx, (mx + 1.0 - px) * ddx)
    sdy = np.where(rdy < 0, (py - my) * ddy, (my + 1.0 - py) * ddy)
    side = np.zeros(px.shape, np.int8)
    mat = np.zeros(px.shape, np.int8)
    act = np.arange(px.shape[0])
    G = grid.shape[0]
    for _ in range(4 * G):
        if act.size == 0:
            break
        ax = sdx[act] < sdy[act]                                   # step in x for these rays
        ix, iy = act[ax], act[~ax]
        mx[ix] += sx[ix]
        sdx[ix] += ddx[ix]
        my[iy] += sy[iy]
        sdy[iy] += ddy[iy]
        side[act] = np.where(ax, 0, 1)
        m = grid[np.clip(my[act], 0, G - 1), np.clip(mx[act], 0, G - 1)]
        hit = m > 0
        mat[act[hit]] = m[hit]
        act = act[~hit]
    perp = np.where(side == 0, sdx - ddx, sdy - ddy)
    perp = np.maximum(perp, 1e-3)
    u = np.where(side == 0, py + perp * rdy, px + perp * rdx)
    return perp, side, mat, u - np.floor(u)


@lru_cache(maxsize=16)
def _geometry(h: int, w: int):
    plane = math.tan(math.radians(FOV_DEG) / 2)
    cam = (2.0 * (np.arange(w) + 0.5) / w - 1.0) * plane          # [W]
    yy = np.arange(h) + 0.5 - h / 2.0                             # [H] rows relative to horizon
    row_dist = (h / 2.0) / np.abs(yy)                              # [H] floor/ceiling distance
    return _frozen(cam), _frozen(yy), _frozen(row_dist)


@lru_cache(maxsize=64)
def _palette(theme: str, time: str, h: int) -> np.ndarray:
    """The theme's flat atlas, then one sky colour per screen row, tinted by the time of day
    -> float32 [5*TEX*TEX + H, 3]; sky pixels index the rows after the atlas."""
    A = _assets(theme)
    tint = np.asarray(TIME_LIGHT[time][1], np.float32)
    rows = np.zeros((h, 3), np.float32)
    if A["sky"] is not None:
        top, hor = (np.asarray(c, np.float32) for c in A["sky"])
        yy = np.arange(h) + 0.5 - h / 2.0
        g = np.clip((yy + h / 2.0) / (h / 2.0), 0, 1)[:, None].astype(np.float32)   # [H, 1]
        rows = top[None] * (1 - g) + hor[None] * g                                  # [H, 3]
    return _frozen(np.concatenate([A["flat"].astype(np.float32), rows]) * tint)


def render(world: World, poses, times, look: Look, size: int | tuple[int, int] = 64) -> np.ndarray:
    """poses [N, 3] (x, y, yaw), times [N] frame indices -> uint8 frames [N, H, W, 3].

    Rays are cast per column in float64; the per-pixel work runs in float32 with one palette
    gather (walls, floor, ceiling and sky), sprites written through their masks, and lighting
    and fog folded into one scale and one additive term per pixel."""
    h, w = (size, size) if isinstance(size, int) else size
    f32 = np.float32
    poses = np.asarray(poses, np.float64).reshape(-1, 3)
    times = np.asarray(times, np.float64).reshape(-1)
    n = poses.shape[0]
    A = _assets(look.theme)
    pal = _palette(look.theme, look.time, h)
    cam, yy, row_dist = _geometry(h, w)
    px, py, yaw = poses[:, 0:1], poses[:, 1:2], poses[:, 2:3]               # [N, 1]
    cx, cy = np.cos(yaw), np.sin(yaw)
    rdx, rdy = cx - cy * cam[None], cy + cx * cam[None]                       # [N, W] ray dirs
    perp, side, mat, u = _cast(world.grid, np.broadcast_to(px, (n, w)).ravel(),
                               np.broadcast_to(py, (n, w)).ravel(), rdx.ravel(), rdy.ravel())
    perp, side, mat, u = (a.reshape(n, w) for a in (perp, side, mat, u))
    # --- palette index and depth per pixel -------------------------------------------------
    yy32, rd32 = yy.astype(f32), row_dist.astype(f32)
    perp32 = perp.astype(f32)
    wall = (np.abs(yy32)[None, :, None] * perp32[:, None, :]) < f32(h / 2.0)   # [N, H, W]
    tv_w = np.clip(((yy32[None, :, None] / (f32(h) / perp32[:, None, :]) + f32(0.5)) * TEX).astype(np.int32),
                   0, TEX - 1)
    tu_w = np.clip((u * TEX).astype(np.int32), 0, TEX - 1)[:, None, :]
    fx = px.astype(f32)[:, :, None] + rd32[None, :, None] * rdx.astype(f32)[:, None, :]   # [N, H, W]
    fy = py.astype(f32)[:, :, None] + rd32[None, :, None] * rdy.astype(f32)[:, None, :]
    tu_f = ((fx - np.floor(fx)) * TEX).astype(np.int32)
    tv_f = ((fy - np.floor(fy)) * TEX).astype(np.int32)
    below = (yy > 0)[None, :, None]
    has_sky = A["sky"] is not None
    sky = ~wall & ~below if has_sky else None
    flat_idx = (np.where(below, 3, 4) * TEX + tv_f) * TEX + tu_f
    if has_sky:
        flat_idx = np.where(sky, 5 * TEX * TEX + np.arange(h)[None, :, None], flat_idx)
    idx = np.where(wall, ((mat[:, None, :].astype(np.int32) - 1) * TEX + tv_w) * TEX + tu_w, flat_idx)
    color = pal[idx]                                                          # [N, H, W, 3] tinted
    depth = np.where(wall, perp32[:, None, :], rd32[None, :, None])           # [N, H, W]
    if has_sky:
        depth[sky] = 60.0
    emissive = np.zeros(depth.shape, bool)
    # --- sprites (lanterns): depth-tested discs, emissive ---------------------------------
    plane = math.tan(math.radians(FOV_DEG) / 2)
    xs = np.arange(w, dtype=f32)[None, None, :]
    ys = np.arange(h, dtype=f32)[None, :, None]
    glow_rgb = np.asarray(A["sprite"], f32) * np.asarray(TIME_LIGHT[look.time][1], f32)
    for sp in world.sprites:
        pos = sp.position(times)                                              # [N, 3]
        rx, ry = pos[:, 0] - poses[:, 0], pos[:, 1] - poses[:, 1]
        dep = rx * cx[:, 0] + ry * cy[:, 0]                                   # [N] depth along view
        lat = (-rx * cy[:, 0] + ry * cx[:, 0]) / plane                        # [N]
        ok = dep > 0.15
        if not ok.any():
            continue
        dep_s = np.where(ok, dep, 1.0)
        scx = ((w / 2.0) * (1 + lat / dep_s) - 0.5).astype(f32)               # [N] screen centre x
        scy = (h / 2.0 - 0.5 + (h / dep_s) * (-pos[:, 2])).astype(f32)        # [N] screen centre y
        rad_x = ((w / 2.0) / plane * _SPRITE_RADIUS / dep_s).astype(f32)[:, None, None]   # [N, 1, 1] px
        rad_y = (h * _SPRITE_RADIUS / dep_s).astype(f32)[:, None, None]
        d2 = ((xs - scx[:, None, None]) / rad_x) ** 2 + ((ys - scy[:, None, None]) / rad_y) ** 2
        d32 = np.where(ok, dep_s, np.inf).astype(f32)[:, None, None]
        m = (d2 < 1.0) & (d32 < depth)
        if m.any():
            color[m] = (f32(1.15) - f32(0.6) * d2[m])[:, None] * glow_rgb[None]
            depth[m] = np.broadcast_to(d32, depth.shape)[m]
            emissive |= m
    # --- lighting and fog: color * scale + fog_colour * (1 - f) ------------------------------
    level, tint, k = TIME_LIGHT[look.time]
    scale = f32(level) / (f32(1.0) + f32(k) * depth * depth) if k else np.full(depth.shape, f32(level))
    scale[wall & (side[:, None, :] == 1)] *= f32(0.72)
    # everything above the horizon that is not wall (sky, or the ceiling) is lit flat
    scale[~wall & ~below] = max(level, 0.6) * (0.25 if has_sky and look.time == "night" else 1.0)
    scale[emissive] = 1.0
    dens = WEATHER_FOG[look.weather] + (0.04 if look.time == "night" else 0.0)
    if dens > 0:
        f = np.exp(f32(-dens) * depth)                                        # [N, H, W]
        scale *= f
        fog = (np.asarray(A["fog"], f32) * f32(0.35 if look.time == "night" else 1.0)
               * np.asarray(tint, f32))
        color *= scale[..., None]
        color += (f32(1.0) - f)[..., None] * fog
    else:
        color *= scale[..., None]
    np.clip(color, 0.0, 1.0, out=color)
    color *= f32(255.0)
    color += f32(0.5)
    return color.astype(np.uint8)


def render_mix(world: World, poses, times, look_a: Look, look_b: Look, mix, size=64) -> np.ndarray:
    """Cross-fade between two looks per frame (mix [N] in [0, 1], 1 = look_b). -> uint8 [N, H, W, 3]"""
    mix = np.asarray(mix, np.float32).reshape(-1, 1, 1, 1)
    if np.all(mix <= 0):
        return render(world, poses, times, look_a, size)
    if np.all(mix >= 1):
        return render(world, poses, times, look_b, size)
    a = render(world, poses, times, look_a, size).astype(np.float32)
    b = render(world, poses, times, look_b, size).astype(np.float32)
    return (a * (1 - mix) + b * mix + 0.5).astype(np.uint8)


__all__ = ["World", "Sprite", "render", "render_mix", "THEMES", "TURN_DEG", "FORWARD", "STRAFE"]
