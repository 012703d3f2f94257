"""Actions: validation and encoding against a model's declared :class:`ActionSpace`.

An action is a dict ``{"keys": ["W", "A"], "mouse": [dx, dy]}`` (both fields optional).
Encoded per frame as ``[multi-hot over space.keys..., dx, dy]`` (float32, length
``space.dim``). ``None`` means "no input" (all zeros).
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable

import torch

from ..config import ActionSpace
from ..errors import ActionError

Action = dict[str, Any]


def validate_action(space: ActionSpace, action: Action | None) -> Action:
    """Return a normalised copy of ``action`` or raise :class:`ActionError`."""
    if action is None:
        return {"keys": [], "mouse": [0.0, 0.0]}
    if not isinstance(action, dict):
        raise ActionError(f"an action must be an object with 'keys' and/or 'mouse', got {type(action).__name__}")
    unknown = sorted(set(action) - {"keys", "mouse", "frame"})
    if unknown:
        raise ActionError(f"unknown action field(s): {', '.join(unknown)}")
    keys = action.get("keys", [])
    if isinstance(keys, str) or not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
        raise ActionError("action 'keys' must be a list of key names")
    if keys and not space.keys:
        raise ActionError("this model declares no action keys")
    bad = [k for k in keys if k not in space.keys]
    if bad:
        shown = [k[:20] for k in bad[:5]] + (["..."] if len(bad) > 5 else [])
        raise ActionError(f"key(s) {shown} not in the model's action space {list(space.keys)}")
    mouse = action.get("mouse", [0.0, 0.0])
    if (not isinstance(mouse, (list, tuple)) or len(mouse) != 2
            or not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in mouse)):
        raise ActionError("action 'mouse' must be [dx, dy] numbers")
    try:
        mouse = [float(m) for m in mouse]
    except OverflowError:        # an integer too large for a float (JSON allows any number of digits)
        raise ActionError(f"action 'mouse' values must lie in [-{space.mouse_range}, {space.mouse_range}]; "
                          "got an integer too large for a number") from None
    if any(not math.isfinite(m) for m in mouse):
        raise ActionError("action 'mouse' values must be finite")
    if any(m != 0.0 for m in mouse):
        if not space.mouse:
            raise ActionError("this model declares no mouse input")
        if any(abs(m) > space.mouse_range for m in mouse):
            raise ActionError(f"mouse values must lie in [-{space.mouse_range}, {space.mouse_range}], got {mouse}")
    return {"keys": list(dict.fromkeys(keys)), "mouse": mouse}


def encode_action(space: ActionSpace, action: Action | None) -> torch.Tensor:
    """One action -> float32 vector [space.dim]."""
    a = validate_action(space, action)
    vec = [1.0 if k in a["keys"] else 0.0 for k in space.keys]
    if space.mouse:
        vec += [a["mouse"][0] / space.mouse_range, a["mouse"][1] / space.mouse_range]
    return torch.tensor(vec, dtype=torch.float32)


def encode_actions(space: ActionSpace, actions: Iterable[Action | None]) -> torch.Tensor:
    """A sequence of actions -> [N, space.dim]."""
    rows = [encode_action(space, a) for a in actions]
    if not rows:
        return torch.zeros(0, space.dim)
    return torch.stack(rows)


def decode_action(space: ActionSpace, vec) -> Action:
    """Inverse of :func:`encode_action` (keys with value > 0.5)."""
    vec = [float(v) for v in vec]
    keys = [k for k, v in zip(space.keys, vec) if v > 0.5]
    mouse = [0.0, 0.0]
    if space.mouse:
        n = len(space.keys)
        mouse = [vec[n] * space.mouse_range, vec[n + 1] * space.mouse_range]
    return {"keys": keys, "mouse": mouse}


def load_actions_jsonl(path: str, space: ActionSpace) -> list[Action]:
    """Read an actions file: one JSON object per line, line i = video frame i.

    Blank lines are skipped. Every line is validated; errors name the line number.
    """
    out: list[Action] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise ActionError(f"cannot read actions file {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ActionError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        try:
            out.append(validate_action(space, obj))
        except ActionError as e:
            raise ActionError(f"{path}:{n}: {e}") from None
    return out
