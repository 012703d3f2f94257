"""The model-loading command-line flags, defined once for every command that loads a model.

    ap = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_model_args(ap)                     # --model --config --device --dtype --attn-backend ...
    args = ap.parse_args()
    pipe, notice = load_pipeline(args)     # warnings printed before the weights load

Used by ``streamgen generate`` / ``bench`` (:mod:`streamgen.cli`), ``streamgen demo`` and
``streamgen serve``. Everything here imports torch only when a model is actually loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ConfigError, StreamgenError  # noqa: F401  (StreamgenError: for callers)

ATTN_BACKENDS = ("sdpa", "math", "triton", "flex", "xformers", "flash")   # == attention.BACKENDS
VAES = ("preview", "wan", "taehv", "tiny-ae")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after every option that has a meaningful default."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("%(default)" in h or d is None or d is False or d is argparse.SUPPRESS
                or not action.option_strings or isinstance(action, argparse._VersionAction)):
            return h
        return f"{h} (default: %(default)s)" if h else "(default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments give one ``error: ...`` line (and a pointer to --help), exit code 2."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = "default") -> None:
    """The flags that choose and load a model (one definition for every command)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help="shipped model name ('default'), preset name (with --random-weights) or checkpoint path")
    g.add_argument("--config", default=None, metavar="PRESET",
                   help="pipeline preset for checkpoints that carry no config (e.g. self-forcing)")
    g.add_argument("--random-weights", action="store_true",
                   help="random init, untrained: only for speed tests and plumbing")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights and activations")
    g.add_argument("--attn-backend", default="sdpa", choices=ATTN_BACKENDS, metavar="BACKEND",
                   help=f"attention kernel: {' | '.join(ATTN_BACKENDS)}; one that cannot run here "
                        "falls back to sdpa with a warning")
    g.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: the model's)")
    g.add_argument("--height", type=int, default=None, help="video height in pixels (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="video width in pixels (default: the model's)")
    g.add_argument("--vae", default=None, choices=VAES,
                   help="decoder (default: the model's); taehv = the fast causal decoder")
    g.add_argument("--text-encoder-path", default=None, metavar="DIR", help="local UMT5 directory (Wan models)")
    g.add_argument("--vae-path", default=None, metavar="PATH",
                   help="local AutoencoderKLWan directory or TAEHV file (Wan models)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for small models, which run best with 1 on a busy machine)")


def check_model_args(args) -> None:
    """Cheap checks of the model flags, before anything is loaded."""
    for name in ("steps", "height", "width", "threads"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise ConfigError(f"--{name} must be > 0, got {v}")


def quiet_libraries() -> None:
    """No progress bars or info logs from the libraries that load the text encoder / weights."""
    import logging
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # also transformers' "Loading weights" bar
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("sentence_transformers", "transformers", "huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "transformers" in sys.modules:
        try:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        except AttributeError:  # pragma: no cover
            pass


def attention_warning(requested: str, device: str) -> str | None:
    """A warning line when ``requested`` cannot run on ``device`` (it would fall back to sdpa)."""
    from .models.attention import resolve_backend
    got = resolve_backend(requested, device)
    if got == requested:
        return None
    why = {"triton": "needs a CUDA GPU with triton (or TRITON_INTERPRET=1 on the CPU)",
           "flash": "needs a CUDA GPU with flash-attn installed",
           "xformers": "needs a CUDA GPU with xformers installed",
           "flex": "needs torch.nn.attention.flex_attention"}.get(requested, "is unavailable")
    return f"warning: --attn-backend {requested} {why}; running {got} instead"


def _overrides(args) -> dict:
    over = {}
    for name in ("height", "width", "vae"):
        v = getattr(args, name, None)
        if v is not None:
            over[name] = v
    return over


def shipped_dir(model: str) -> str | None:
    """The folder of a shipped model (``streamgen.engine.pipeline.SHIPPED``, without importing torch)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", model) if model == "default" else None


def shipped_missing(model: str) -> bool:
    root = shipped_dir(model)
    return root is not None and not os.path.exists(os.path.join(root, "config.json"))


def apply_fallback(args) -> str | None:
    """A missing shipped 'default' model becomes untrained 'tiny-world' (``args`` is changed);
    returns the notice that says so, or None."""
    if not shipped_missing(args.model):
        return None
    notice = (f"the shipped model 'default' is not installed (expected in {shipped_dir(args.model)}); "
              "falling back to 'tiny-world' with random weights")
    args.model, args.random_weights = "tiny-world", True
    return notice


def load_pipeline(args, *, fallback: bool = False, log=None):
    """Load the Pipeline the model flags describe -> (pipe, notice).

    Prints the attention-fallback warning before the weights load. ``fallback``: a missing
    shipped 'default' model loads untrained 'tiny-world' instead, and ``notice`` says so
    (``notice`` also says when the weights are random)."""
    log = sys.stderr if log is None else log
    check_model_args(args)
    quiet_libraries()
    import torch
    from .engine.pipeline import Pipeline
    notice = apply_fallback(args) if fallback else None
    model, random_weights = args.model, bool(args.random_weights)
    warn = attention_warning(args.attn_backend, args.device)
    if warn:
        print(warn, file=log, flush=True)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(model, device=args.device, dtype=args.dtype, attn_backend=args.attn_backend,
                                    random_weights=random_weights, config=args.config, steps=args.steps,
                                    text_encoder_path=getattr(args, "text_encoder_path", None),
                                    vae_path=getattr(args, "vae_path", None), **_overrides(args))
    if getattr(args, "threads", None) is None and pipe.device.type == "cpu" and pipe.config.model.dim <= 512:
        # small models gain nothing from intra-op threads, and spinning threads collapse
        # throughput (100x measured) when another process shares the cores
        torch.set_num_threads(1)
    if notice is None and not pipe.trained:
        notice = f"'{model}' was loaded with --random-weights"
    return pipe, notice


def build_pipeline(args, **kw):
    """:func:`load_pipeline` without the notice."""
    return load_pipeline(args, **kw)[0]


def peek_config(args, *, fallback: bool = False):
    """The PipelineConfig the flags would load, without loading weights (shipped models and
    presets; None for checkpoint paths, whose config needs the file read)."""
    import dataclasses
    from .config import PIPELINE_PRESETS, PipelineConfig
    model = args.model
    if shipped_missing(model):
        if not fallback:
            return None                 # loading it gives the error
        model = "tiny-world"
    root = shipped_dir(model)
    if args.config is not None and root is None:
        return None
    if root is not None:
        with open(os.path.join(root, "config.json"), encoding="utf-8") as f:
            cfg = PipelineConfig.from_dict(json.load(f))
    elif model in PIPELINE_PRESETS and not os.path.exists(model):
        cfg = PipelineConfig.from_name(model)
    else:
        return None
    over = _overrides(args)
    if args.steps is not None:
        over["sampler"] = cfg.sampler.with_steps(args.steps)
    return dataclasses.replace(cfg, **over) if over else cfg


def model_card_line(source: str, max_chars: int = 320) -> str | None:
    """What the model can and cannot do: the first paragraph of the model's MODEL_CARD.md
    (shipped models and release folders), markdown stripped, at most ``max_chars``."""
    import re
    root = shipped_dir(source) or source
    path = os.path.join(root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root)), "MODEL_CARD.md")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip() and not p.lstrip().startswith("#")]
    if not paras:
        return None
    line = re.sub(r"[*_`]+", "", " ".join(paras[0].split()))
    line = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line)
    if len(line) > max_chars:
        cut = line[:max_chars]
        end = max(cut.rfind(". "), cut.rfind("; "))
        line = cut[:end + 1] if end > max_chars // 3 else cut.rstrip() + "…"
    return line
