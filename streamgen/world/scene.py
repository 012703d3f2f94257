"""Scene looks (theme, time of day, weather), their textures, and captions.

A :class:`Look` is what text controls: the theme (wall/floor/ceiling materials and palette),
the time of day (light level, tint, torch fall-off) and the weather (fog density). The
layout and the moving objects come from the world seed, never from text, so the same place
can be shown in any look.

Captions are generated from a look with varied wording (:func:`caption`); several
captions describe the same scene. :func:`parse_prompt` maps any text back to a look by
keyword matching (unknown text picks a theme from a stable hash), which is how the
ground-truth world follows prompts.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

TEX = 32  # texture side in texels

THEMES = ("brick dungeon", "ice cave", "desert ruins", "neon city", "hedge maze", "lava forge")
TIMES = ("dawn", "day", "dusk", "night")
WEATHERS = ("clear", "hazy", "foggy")


@dataclass(frozen=True)
class Look:
    theme: str = "brick dungeon"
    time: str = "day"
    weather: str = "clear"

    def __post_init__(self):
        if self.theme not in THEMES or self.time not in TIMES or self.weather not in WEATHERS:
            raise ValueError(f"invalid look {self}")

    @property
    def theme_id(self) -> int:
        return THEMES.index(self.theme)


def sample_look(rng: np.random.Generator) -> Look:
    return Look(THEMES[rng.integers(len(THEMES))], TIMES[rng.integers(len(TIMES))],
                WEATHERS[rng.integers(len(WEATHERS))])


# ----------------------------------------------------------------------------- wording
_THEME_WORDS = {
    "brick dungeon": ["brick dungeon", "dungeon of old red bricks", "underground brick labyrinth",
                      "crumbling brick catacomb"],
    "ice cave": ["ice cave", "frozen cavern of blue ice", "glacier tunnel", "icy grotto"],
    "desert ruins": ["desert ruins", "sandstone ruins in the desert", "ancient sun-bleached ruins",
                     "sandy temple ruins"],
    "neon city": ["neon city", "cyberpunk alley lit by neon signs", "neon-lit city maze",
                  "rain-slick neon streets"],
    "hedge maze": ["hedge maze", "garden labyrinth of green hedges", "overgrown hedge garden",
                   "leafy green maze"],
    "lava forge": ["lava forge", "volcanic forge with glowing lava", "obsidian halls over molten lava",
                   "fiery lava temple"],
}
_TIME_WORDS = {
    "dawn": ["at dawn", "at sunrise", "in the pale early-morning light"],
    "day": ["in daylight", "at midday", "in bright daytime light"],
    "dusk": ["at dusk", "at sunset", "in the orange evening light"],
    "night": ["at night", "in the dark of night", "by torchlight at night"],
}
_WEATHER_WORDS = {
    "clear": ["clear air", "clear visibility", "crisp, clear air"],
    "hazy": ["light haze", "a thin mist", "hazy air"],
    "foggy": ["thick fog", "dense fog", "heavy mist rolling through"],
}
_MOVER_WORDS = ["floating lanterns drift through the halls", "glowing orbs patrol the corridors",
                "wisps of light wander back and forth", "hovering beacons move along the passages"]
_TEMPLATES = [
    "A first-person walk through the {theme} {time}, {weather}. {movers}.",
    "{Time}, exploring the {theme} in first person with {weather}; {movers}.",
    "First-person view of the {theme} {time} with {weather}.",
    "Walking through the {theme}, {weather}, {time}. {Movers}.",
    "The {theme} seen through the eyes of an explorer {time}; {weather}.",
]

# Extra keywords that also identify a value when parsing free text.
_THEME_KEYS = {
    "brick dungeon": ["brick", "dungeon", "catacomb"],
    "ice cave": ["ice", "icy", "frozen", "glacier", "snow", "cave"],
    "desert ruins": ["desert", "sand", "ruin", "sandstone"],
    "neon city": ["neon", "cyberpunk", "city", "street", "alley"],
    "hedge maze": ["hedge", "garden", "green", "leaf", "leafy", "grass"],
    "lava forge": ["lava", "forge", "volcan", "molten", "fire", "obsidian"],
}
_TIME_KEYS = {"dawn": ["dawn", "sunrise", "morning"], "day": ["day", "midday", "noon", "daylight"],
              "dusk": ["dusk", "sunset", "evening"], "night": ["night", "dark", "torch", "midnight"]}
_WEATHER_KEYS = {"clear": ["clear", "crisp"], "hazy": ["haze", "hazy", "mist", "thin"],
                 "foggy": ["fog", "foggy", "dense", "heavy"]}


def caption(look: Look, rng: np.random.Generator) -> str:
    """One of many captions of ``look`` (wording drawn from ``rng``)."""
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    theme, time = pick(_THEME_WORDS[look.theme]), pick(_TIME_WORDS[look.time])
    weather, movers = pick(_WEATHER_WORDS[look.weather]), pick(_MOVER_WORDS)
    text = pick(_TEMPLATES).format(theme=theme, time=time, weather=weather, movers=movers,
                                   Time=time[0].upper() + time[1:], Movers=movers[0].upper() + movers[1:])
    return text


def _score(text: str, table: dict[str, list[str]]) -> str | None:
    best, best_n = None, 0
    for value, words in table.items():
        # longer (more specific) phrases weigh more: "heavy mist" beats "mist"
        n = sum(len(w) * len(re.findall(r"\b" + re.escape(w), text)) for w in words)
        if n > best_n:
            best, best_n = value, n
    return best


def parse_prompt(text: str, default: Look | None = None) -> Look:
    """Map free text to a look. Unmatched fields keep ``default`` (theme: stable text hash)."""
    t = text.lower()
    theme = _score(t, {k: _THEME_WORDS[k] + v for k, v in _THEME_KEYS.items()})
    if theme is None:
        theme = default.theme if default else THEMES[int(hashlib.sha1(t.encode()).hexdigest(), 16) % len(THEMES)]
    time = _score(t, {k: _TIME_WORDS[k] + v for k, v in _TIME_KEYS.items()}) or (default.time if default else "day")
    weather = _score(t, {k: _WEATHER_WORDS[k] + v for k, v in _WEATHER_KEYS.items()}) or (default.weather if default else "clear")
    return Look(theme, time, weather)


# ----------------------------------------------------------------------------- textures
def _noise(rng, scale=1.0):
    return rng.standard_normal((TEX, TEX, 1)).astype(np.float32) * scale


def _bricks(rng, base, mortar, rows=4, cols=2, jitter=0.08):
    """Brick/block pattern. base, mortar: RGB in [0, 1]. -> [TEX, TEX, 3]"""
    y, x = np.mgrid[0:TEX, 0:TEX]
    bh, bw = TEX // rows, TEX // cols
    r = y // bh
    xs = (x + (r % 2) * (bw // 2)) % TEX
    c = xs // bw
    tint = rng.uniform(-jitter, jitter, size=(rows, cols + 1, 1)).astype(np.float32)
    tex = np.asarray(base, np.float32)[None, None] + tint[r, c] + _noise(rng, 0.03)
    is_mortar = ((y % bh) == 0) | ((xs % bw) == 0)
    tex[is_mortar] = mortar
    return tex


def _stripes(rng, base, line, period=8, axis=0, width=1):
    y, x = np.mgrid[0:TEX, 0:TEX]
    coord = y if axis == 0 else x
    tex = np.asarray(base, np.float32)[None, None] + _noise(rng, 0.03)
    tex[(coord % period) < width] = line
    return tex


def _speckle(rng, base, amount=0.08):
    return np.asarray(base, np.float32)[None, None] + _noise(rng, amount)


def _cracks(rng, base, glow, n=5):
    tex = _speckle(rng, base, 0.04)
    for _ in range(n):
        y, x = rng.integers(TEX, size=2)
        for _ in range(TEX):
            tex[y % TEX, x % TEX] = glow
            y += rng.integers(-1, 2)
            x += 1
    return tex


def theme_assets(theme: str) -> dict:
    """Fixed (seed-independent) textures and colours of a theme; all RGB floats in [0, 1].

    Returns ``atlas`` [5, TEX, TEX, 3] (3 wall variants, floor, ceiling), ``sky`` (top and
    horizon colours, or None for a ceiling), ``sprite`` [3] RGB and ``fog`` [3] RGB.
    """
    rng = np.random.default_rng(THEMES.index(theme) + 1234)
    if theme == "brick dungeon":
        walls = [_bricks(rng, (0.55, 0.22, 0.16), (0.35, 0.32, 0.3)),
                 _bricks(rng, (0.45, 0.18, 0.14), (0.3, 0.28, 0.26), rows=8),
                 _bricks(rng, (0.4, 0.38, 0.36), (0.25, 0.24, 0.22), rows=4, cols=4)]
        floor, ceil, sky = _bricks(rng, (0.33, 0.31, 0.3), (0.2, 0.2, 0.2), 2, 2), _speckle(rng, (0.18, 0.16, 0.15)), None
        sprite, fog = (1.0, 0.75, 0.3), (0.25, 0.22, 0.2)
    elif theme == "ice cave":
        walls = [_stripes(rng, (0.65, 0.82, 0.95), (0.85, 0.95, 1.0), 6, 1),
                 _speckle(rng, (0.55, 0.75, 0.92), 0.06),
                 _stripes(rng, (0.5, 0.7, 0.9), (0.9, 0.97, 1.0), 11, 0, 2)]
        floor, ceil, sky = _speckle(rng, (0.88, 0.92, 0.96), 0.04), _speckle(rng, (0.45, 0.6, 0.78), 0.05), None
        sprite, fog = (0.4, 1.0, 0.9), (0.8, 0.88, 0.95)
    elif theme == "desert ruins":
        walls = [_bricks(rng, (0.82, 0.66, 0.42), (0.62, 0.5, 0.33), rows=2, cols=2),
                 _bricks(rng, (0.76, 0.6, 0.38), (0.55, 0.44, 0.3), rows=4, cols=1),
                 _speckle(rng, (0.8, 0.68, 0.48), 0.07)]
        floor, ceil = _stripes(rng, (0.9, 0.78, 0.55), (0.8, 0.66, 0.45), 5, 0, 2), _speckle(rng, (0.5, 0.7, 0.9))
        sky, sprite, fog = ((0.35, 0.6, 0.95), (0.85, 0.85, 0.8)), (0.9, 0.2, 0.2), (0.92, 0.85, 0.7)
    elif theme == "neon city":
        walls = [_stripes(rng, (0.1, 0.1, 0.16), (1.0, 0.15, 0.8), 8, 0),
                 _stripes(rng, (0.12, 0.1, 0.18), (0.1, 0.9, 1.0), 10, 1, 2),
                 _bricks(rng, (0.15, 0.15, 0.2), (0.9, 0.9, 0.3), rows=4, cols=4, jitter=0.03)]
        floor, ceil = _stripes(rng, (0.12, 0.12, 0.14), (0.5, 0.5, 0.55), 16, 1), _speckle(rng, (0.1, 0.05, 0.2))
        sky, sprite, fog = ((0.05, 0.02, 0.15), (0.35, 0.1, 0.45)), (1.0, 1.0, 0.3), (0.3, 0.12, 0.35)
    elif theme == "hedge maze":
        walls = [_speckle(rng, (0.2, 0.5, 0.18), 0.1), _speckle(rng, (0.15, 0.42, 0.14), 0.12),
                 _stripes(rng, (0.22, 0.52, 0.2), (0.45, 0.3, 0.15), 16, 0, 3)]
        floor, ceil = _speckle(rng, (0.35, 0.6, 0.25), 0.07), _speckle(rng, (0.5, 0.7, 0.9))
        sky, sprite, fog = ((0.4, 0.65, 1.0), (0.8, 0.9, 1.0)), (1.0, 0.5, 0.9), (0.75, 0.82, 0.85)
    elif theme == "lava forge":
        walls = [_cracks(rng, (0.12, 0.1, 0.1), (1.0, 0.45, 0.05)),
                 _bricks(rng, (0.2, 0.16, 0.15), (0.9, 0.35, 0.05), rows=4, cols=2),
                 _cracks(rng, (0.16, 0.12, 0.12), (1.0, 0.7, 0.1), n=3)]
        floor, ceil, sky = _cracks(rng, (0.25, 0.1, 0.05), (1.0, 0.5, 0.0), n=8), _speckle(rng, (0.1, 0.06, 0.05)), None
        sprite, fog = (0.3, 0.6, 1.0), (0.5, 0.2, 0.08)
    else:  # pragma: no cover - Look validates themes
        raise ValueError(theme)
    atlas = np.clip(np.stack(walls + [floor, ceil]), 0.0, 1.0).astype(np.float32)
    return {"atlas": atlas, "sky": None if sky is None else np.asarray(sky, np.float32),
            "sprite": np.asarray(sprite, np.float32), "fog": np.asarray(fog, np.float32)}


# light level, RGB tint, torch fall-off k (brightness / (1 + k d^2))
TIME_LIGHT = {"dawn": (0.85, (1.0, 0.88, 0.8), 0.02), "day": (1.0, (1.0, 1.0, 1.0), 0.0),
              "dusk": (0.7, (1.0, 0.75, 0.55), 0.04), "night": (0.9, (0.7, 0.75, 1.0), 0.35)}
WEATHER_FOG = {"clear": 0.0, "hazy": 0.12, "foggy": 0.38}  # density per cell
