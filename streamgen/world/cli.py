"""streamgen world record --seed 0 --frames 64 --out world.mp4 [--actions a.jsonl] [--prompt TEXT] [--size 64] [--json]

``streamgen world`` subcommands:

* ``record``  render one episode to an H.264 MP4 (exactly N frames); prints the path, or with
  ``--json`` an object with the path, frames, size, video fps, render frames/s, caption, the
  per-frame actions and the ground-truth poses [x, y, yaw].
  Actions come from ``--actions FILE.jsonl`` (engine schema, one object per frame; if it has
  fewer lines than ``--frames`` the rest are no-ops) or from ``--policy``.
* ``dataset`` write training shards (see :mod:`streamgen.world.data`) with a progress bar:
  ``streamgen world dataset --out DIR --clips N [--frames 32] [--size 64] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..io.actions import load_actions_jsonl
from ..cli_args import HelpFormatter
from ..errors import ActionError, StreamgenError
from .policies import POLICIES


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


def _world_words(message: str) -> str:
    """The shared action validator speaks of "the model"; here the actions drive the world."""
    return (message.replace("the model's action space", "the world's action space")
            .replace("this model declares", "the world has"))


def _size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be an integer, got {text!r}") from None
    if not 16 <= v <= 256 or v % 2:
        raise argparse.ArgumentTypeError(f"size must be an even number in 16..256, got {v}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="streamgen world", description="Procedural ground-truth world.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("record", help="render an episode to MP4")
    r.add_argument("--seed", type=int, default=0, help="world layout (and the default look)")
    r.add_argument("--frames", type=_positive, default=None, help="frames (default: actions file length, else 64)")
    r.add_argument("--out", required=True, help="output .mp4")
    r.add_argument("--actions", default=None, help="JSONL actions, one per frame")
    r.add_argument("--prompt", default=None, help="text that sets the look (default: the seed's scene)")
    r.add_argument("--policy", default="human", choices=POLICIES, help="action policy without --actions")
    r.add_argument("--size", type=_size, default=64, help="frame side in pixels (even, 16..256)")
    r.add_argument("--fps", type=_positive, default=16, help="video frame rate of the MP4")
    r.add_argument("--json", action="store_true", help="print a JSON report")
    d = sub.add_parser("dataset", help="write training shards")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--clips", type=_positive, required=True, help="number of clips")
    d.add_argument("--frames", type=_positive, default=32, help="frames per clip")
    d.add_argument("--size", type=_size, default=64, help="frame side in pixels (even, 16..256)")
    d.add_argument("--seed", type=int, default=0, help="clip i uses world seed SEED+i")
    d.add_argument("--policy", default="mixed", choices=POLICIES, help="action policy of the clips")
    d.add_argument("--clips-per-shard", type=_positive, default=64, help="clips per .npz shard")
    d.add_argument("--compress", default="zip", choices=("zip", "none"), help="shard compression")
    d.add_argument("--progress", default="bar", choices=("bar", "none"), help="progress bar on stderr")
    d.add_argument("--json", action="store_true", help="print a JSON report")
    return p


def _record(args) -> dict:
    from ..io.video import write_mp4                    # the one MP4 writer: reproducible bytes
    from .episodes import ACTION_SPACE, generate_clip

    actions = None
    if args.actions:
        try:
            actions = load_actions_jsonl(args.actions, ACTION_SPACE)
        except ActionError as e:
            raise StreamgenError(_world_words(str(e))) from None
        if not actions:
            raise StreamgenError(f"actions file {args.actions} is empty: give one JSON action per line, "
                                 '{"keys": ["W"], "mouse": [0, 0]}, or leave --actions out (then --policy acts)')
    n = args.frames or (len(actions) if actions else 64)
    padded = 0
    if actions is not None and len(actions) < n:
        padded = n - len(actions)
        actions = actions + [None] * padded
    t0 = time.perf_counter()
    clip = generate_clip(args.seed, n, args.size, args.policy, prompt=args.prompt, actions=actions)
    dt = time.perf_counter() - t0
    try:
        write_mp4(args.out, clip["frames"], fps=args.fps)
    except OSError as e:
        raise StreamgenError(f"cannot write {args.out}: {e.strerror or e}") from None
    acts = clip["actions"]
    return {"out": args.out, "frames": n, "size": args.size, "fps": args.fps, "seed": args.seed,
            "render_fps": round(n / dt, 1), "caption": clip["caption"],
            "look": {"theme": clip["look"].theme, "time": clip["look"].time, "weather": clip["look"].weather},
            "actions_padded": padded,
            "actions": [{"keys": [k for k, v in zip("WASD", a[:4]) if v > 0.5], "mouse": [round(float(a[4]), 4), round(float(a[5]), 4)]}
                        for a in acts],
            "poses": np.round(clip["pose"].astype(np.float64), 5).tolist()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.cmd == "record":
            rep = _record(args)
            print(json.dumps(rep) if args.json else rep["out"])
        else:
            from .data import write_dataset

            idx = write_dataset(args.out, args.clips, args.frames, args.size, args.seed, args.policy,
                                args.clips_per_shard, args.compress, args.progress)
            rep = {"out": args.out, "clips": idx["clips"], "shards": len(idx["shards"]),
                   "clip_frames": idx["clip_frames"], "size": idx["size"]}
            print(json.dumps(rep) if args.json else args.out)
        return 0
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StreamgenError, ValueError) as e:      # bad input: exit 2, like every streamgen command
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
