"""streamgen eval --model NAME_OR_PATH [--json] [--out report.json] [--device cpu]

Evaluates a generator against the procedural world's ground truth (see
:mod:`streamgen.eval.suite`) and writes a JSON report plus a PNG plot next to it
(``--out`` defaults to ``eval-<model>.json`` in the current folder; ``--plot none`` skips the
plot). ``--json`` also prints the report on stdout; otherwise a short summary is printed.

``--model``: ``ground-truth`` (the world itself: the ceiling), ``frozen`` / ``shuffled``
(corrupted ground truth: reference floors), or anything ``streamgen.Pipeline.from_pretrained``
accepts (a preset name or a checkpoint path).

Defaults are sized for a CPU run of a 64x64 model in a few minutes (about 1,900 generated
frames: 4 action rollouts of 96 frames, 8 revisit rollouts, 2 x 20 s drift, 4 prompt
switches). Long-horizon drift: ``--drift-seconds 60,600,3600 --drift-window 30``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from ..errors import StreamgenError


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _floats(text: str) -> tuple:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"seconds must be positive, got {text!r}")
    return vals


from ..world.cli import _positive  # noqa: E402  (shared argparse type)


def build_parser() -> argparse.ArgumentParser:
    from .suite import ALL_METRICS, EvalSettings

    d = EvalSettings()
    p = _Parser(prog="streamgen eval", description="Evaluate a model against the world's ground truth.")
    p.add_argument("--model", required=True, help="ground-truth | frozen | shuffled | preset name | checkpoint path")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--out", default=None, help="report path (default eval-<model>.json)")
    p.add_argument("--plot", default="png", choices=("png", "none"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--metrics", default="all", help=f"all or a comma list of {','.join(ALL_METRICS)}")
    p.add_argument("--rollouts", type=_positive, default=d.rollouts)
    p.add_argument("--rollout-frames", type=_positive, default=d.rollout_frames)
    p.add_argument("--drift-seconds", type=_floats, default=d.drift_seconds, help="comma list, e.g. 60,600,3600")
    p.add_argument("--drift-window", type=float, default=d.drift_window, help="seconds per FD window")
    p.add_argument("--drift-rollouts", type=_positive, default=d.drift_rollouts)
    p.add_argument("--switch-pre", type=_positive, default=d.switch_pre)
    p.add_argument("--switch-post", type=_positive, default=d.switch_post)
    p.add_argument("--seed", type=int, default=d.seed, help="first held-out world seed (default %(default)s)")
    p.add_argument("--start", default=d.start, choices=("noise", "world"),
                   help="how model sessions open: from noise, or from the world's rendering of the "
                        "look at the seed's spawn (default %(default)s; continuation always opens from true frames)")
    p.add_argument("--continuation-walks", type=_positive, default=d.continuation_walks,
                   help="held-out exploring walks of the continuation metric (>= 2; default %(default)s)")
    p.add_argument("--continuation-chunks", type=_positive, default=d.continuation_chunks,
                   help="generated chunks per walk (default %(default)s)")
    p.add_argument("--evaluators", default=None, help="folder of evaluator weights (default: shipped)")
    return p


def load_generator(name: str, device: str = "cpu"):
    from .suite import CorruptedGenerator, GroundTruthGenerator

    if name in ("ground-truth", "gt", "world"):
        return GroundTruthGenerator()
    if name in ("frozen", "shuffled"):
        return CorruptedGenerator(name)
    try:
        from .. import Pipeline  # lazy: the engine is heavy
    except ImportError:
        try:
            from ..engine.pipeline import Pipeline
        except ImportError as e:
            raise StreamgenError(f"cannot load model {name!r}: streamgen.Pipeline is unavailable ({e})") from None
    try:
        return Pipeline.from_pretrained(name, device=device)
    except StreamgenError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise StreamgenError(f"cannot load model {name!r}: {e}") from None


def plot_report(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["metrics"]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax = ax.ravel()
    if "action_following" in m:
        a = m["action_following"]
        names = ["W", "A", "S", "D", "turn", "score"]
        for i, (who, c) in enumerate((("model", "C0"), ("ground_truth", "C2"))):
            vals = [a[who].get(k, float("nan")) for k in names]
            ax[0].bar([j + 0.4 * i for j in range(len(names))], vals, 0.4, color=c, label=who)
        ax[0].set_xticks([j + 0.2 for j in range(len(names))], names)
        ax[0].set_title(f"action following (ratio {a['ratio']:.2f})")
        ax[0].legend()
    if "drift" in m:
        c = m["drift"]["curve"]
        ax[1].plot([x["t1"] for x in c], [x["fd"] for x in c], "o-", label="model")
        if "world_fd" in m:
            ax[1].axhline(m["world_fd"]["other_seeds"], color="C2", ls="--", label="GT vs GT of other seeds")
        ax[1].set_xlabel("seconds")
        ax[1].set_title("drift: World-FD per window")
        ax[1].legend()
    if "revisit" in m:
        rows = m["revisit"]["rollouts"]
        ax[2].bar(range(len(rows)), [r["model"]["similarity"] for r in rows], color="C0", label="model")
        ax[2].plot(range(len(rows)), [r["ground_truth"]["similarity"] for r in rows], "k_", ms=20, label="ground truth")
        ax[2].set_xticks(range(len(rows)), [f"{r['kind']}\n{r['seed']}" for r in rows], fontsize=7)
        ax[2].set_ylim(0, 1.05)
        ax[2].set_title("revisit similarity")
        ax[2].legend()
    if "prompt_switch" in m:
        for who, c in (("model", "C0"), ("ground_truth", "C2")):
            ax[3].plot(m["prompt_switch"]["p_new_curve"][who], color=c, label=who)
        ax[3].set_xlabel("frames after switch")
        ax[3].set_title("p(new theme) after prompt switch")
        ax[3].set_ylim(0, 1.05)
        ax[3].legend()
    fig.suptitle(f"streamgen eval: {report.get('model', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _clean(obj):
    """NaN/inf -> None so the report is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        from .evaluators import ASSETS, Evaluators
        from .suite import ALL_METRICS, EvalSettings, run_suite

        mets = ALL_METRICS if args.metrics == "all" else tuple(x.strip() for x in args.metrics.split(",") if x.strip())
        bad = sorted(set(mets) - set(ALL_METRICS))
        if bad or not mets:
            raise _UsageError(f"--metrics: unknown metric(s) {bad}; known: all, {', '.join(ALL_METRICS)}")
        if not args.drift_window > 0:
            raise _UsageError("--drift-window must be > 0")
        settings = EvalSettings(rollouts=args.rollouts, rollout_frames=max(args.rollout_frames, 16),
                                drift_seconds=args.drift_seconds, drift_window=args.drift_window,
                                drift_rollouts=args.drift_rollouts, switch_pre=max(args.switch_pre, 2),
                                switch_post=max(args.switch_post, 24), seed=args.seed, metrics=mets,
                                start=args.start, continuation_walks=max(args.continuation_walks, 2),
                                continuation_chunks=args.continuation_chunks)
        ev = Evaluators.load(args.evaluators or ASSETS)
        gen = load_generator(args.model, args.device)
        log = lambda msg: print(f"[eval] {msg}", file=sys.stderr)  # noqa: E731
        from functools import partial

        from tqdm import tqdm
        bar = partial(tqdm, file=sys.stderr, leave=False, disable=not sys.stderr.isatty())
        report = {"model": args.model, **run_suite(gen, settings, ev, progress=log, bar=bar)}
        out = Path(args.out or f"eval-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.model).strip('_.') or 'model'}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.plot == "png":
            report["plot"] = str(out.with_suffix(".png"))
            plot_report(report, report["plot"])
        report = _clean(report)
        out.write_text(json.dumps(report, indent=1))
        report["report"] = str(out)
        if args.json:
            print(json.dumps(report))
        else:
            m = report["metrics"]
            summary = {"report": str(out)}
            if "action_following" in m:
                summary["action_ratio"] = m["action_following"]["ratio"]
            if "world_fd" in m:
                summary["world_fd"] = m["world_fd"]["model"]
            if "revisit" in m:
                summary["revisit_similarity"] = m["revisit"]["model"]["similarity"]
            if "prompt_switch" in m:
                summary["frames_to_switch"] = m["prompt_switch"]["model"]["frames_to_switch"]
            if "drift" in m:
                summary["drift_last_over_first"] = m["drift"]["last_over_first"]
            if "continuation" in m:
                c = m["continuation"]
                summary["continuation_psnr_chunk1"] = c["model"]["psnr"][0]
                summary["continuation_psnr_mean"] = c["model"]["psnr_mean"]
                summary["copy_last_psnr_chunk1"] = c["copy_last"]["psnr"][0]
                summary["copy_last_psnr_mean"] = c["copy_last"]["psnr_mean"]
                summary["shuffled_actions_cost_db"] = c["action_sensitivity_db"]
                summary["continuation_edge_ratio"] = c["model"]["edge_ratio_mean"]
            print(json.dumps(summary))
        return 0
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StreamgenError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
