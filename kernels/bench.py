"""Attention benchmark: TFLOP/s and time per call of every available backend, as JSON.

    python -m streamgen.kernels.bench [--json] [--quick] [--shapes auto|tiny|quick|full]
                                      [--dtypes bf16,fp16] [--budget SECONDS] [--out FILE]

GPU (full): Wan2.1-1.3B shapes, 12 heads x 128, streaming Lq = 4680 (3-frame chunk) and
1560 (frame-wise) against Lk = 4680 .. 32760 cached keys (3-frame sink included), bf16 and
fp16; plus block-causal training fwd and fwd+bwd over 21 frames. FLOPs count only visible
query-key pairs: 4 * pairs * D forward, 2.5x that for the backward.

CPU (no GPU): a tiny quick mode under the Triton interpreter so CI can smoke the script and
the JSON shape; its timings say nothing about GPU speed ("timings_meaningful": false).

``--budget S``: no new measurement starts after S seconds (the rest are rows with
``"skipped"``), so a caller with a hard time cap still gets its JSON. With ``--out`` the file
is rewritten after every row (a killed run leaves what it measured).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel is defined

from streamgen.models.attention import FrameMask, attention  # noqa: E402
from streamgen.models.rope import apply_rope  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WAN_T = 1560                                        # tokens per latent frame (Wan2.1 480x832)


def _timer(fn, cuda: bool, reps: int) -> float:
    """Milliseconds per call."""
    if cuda:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
          "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def run(q, k, v):
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def _flash_fns():
    """flash-attn 3 (Hopper) and 2 when installed: name -> fn(q, k, v) on [B, L, H, D]."""
    fns = {}
    try:
        from flash_attn_interface import flash_attn_func as fa3
        fns["flash-attn-3"] = lambda q, k, v: fa3(q, k, v)
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func as fa2
        fns["flash-attn-2"] = lambda q, k, v: fa2(q, k, v)
    except ImportError:
        pass
    return fns


def stream_backends(cuda: bool):
    """name -> fn(q, k_cache, v_cache, key_valid, k_rope) for the streaming case."""
    from streamgen.kernels.stream_attention import stream_attention as triton_stream
    b = {"triton": lambda q, k, v, kv, kr: triton_stream(q, k, v, kv),
         "triton+k_rope": lambda q, k, v, kv, kr: triton_stream(q, k, v, kv, k_rope=kr),
         "sdpa": lambda q, k, v, kv, kr: attention(q, k, v, backend="sdpa"),
         "sdpa+k_rope": lambda q, k, v, kv, kr: attention(q, apply_rope(k, *kr), v, backend="sdpa")}
    if cuda:
        for name in ("flash", "efficient", "cudnn"):
            fn = _sdpa_backend(name)
            b[f"sdpa-{name}"] = lambda q, k, v, kv, kr, fn=fn: fn(q, k, v)
        b["flex"] = lambda q, k, v, kv, kr: attention(q, k, v, backend="flex")
        try:
            import xformers.ops as xops
            b["xformers"] = lambda q, k, v, kv, kr: xops.memory_efficient_attention(q, k, v)
        except ImportError:
            pass
        for name, fn in _flash_fns().items():
            b[name] = lambda q, k, v, kv, kr, fn=fn: fn(q, k, v)
    return b


class Budget:
    """Soft time budget shared by the loops; ``on_row`` is called after every row."""

    def __init__(self, seconds=None, on_row=None):
        self.deadline = None if seconds is None else time.time() + seconds
        self.on_row = on_row or (lambda rows: None)
        self.rows = []

    def over(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def add(self, row):
        self.rows.append(row)
        self.on_row(self.rows)


def bench_stream(cfgs, dtypes, cuda, reps, dev, budget=None):
    budget = budget or Budget()
    rows = []
    for dtype in dtypes:
        for B, H, D, Lq, Lk in cfgs:
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(B, Lq, H, D, device=dev, dtype=dtype, generator=g)
            k, v = (torch.randn(B, Lk, H, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
            valid = torch.ones(B, Lk, dtype=torch.bool, device=dev)
            ang = torch.rand(B, Lk, D // 2, device=dev, generator=g) * 6
            kr = (ang.cos(), ang.sin())
            flops = 4.0 * B * H * Lq * Lk * D
            ref = None
            for name, fn in stream_backends(cuda).items():
                row = dict(kernel="stream", backend=name, dtype=str(dtype).split(".")[-1],
                           B=B, H=H, D=D, Lq=Lq, Lk=Lk, visible_pairs=B * Lq * Lk)
                if budget.over():
                    row["skipped"] = "time budget"
                    rows.append(row)
                    budget.add(row)
                    continue
                try:
                    out = fn(q, k, v, valid, kr)
                    if out is None:
                        raise RuntimeError("kernel declined the call (returned None)")
                    if not name.endswith("k_rope"):
                        ref = out.float() if ref is None else ref
                        row["max_abs_diff_vs_first"] = float((out.float() - ref).abs().max())
                    ms = _timer(lambda: fn(q, k, v, valid, kr), cuda, reps)
                    row.update(ms=float(f"{ms:.4g}"), tflops=float(f"{flops / ms / 1e9:.4g}"))
                except Exception as e:   # a backend that cannot run is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(row)
                budget.add(row)
    return rows


def bench_block_causal(cfgs, dtypes, cuda, reps, dev, budget=None):
    from streamgen.kernels.block_causal import block_causal_attention
    budget = budget or Budget()
    rows = []
    backends = {"triton": lambda q, k, v, m: block_causal_attention(q, k, v, m),
                "sdpa-dense-mask": lambda q, k, v, m: attention(q, k, v, m, backend="sdpa")}
    if cuda:
        backends["flex"] = lambda q, k, v, m: attention(q, k, v, m, backend="flex")
    for dtype in dtypes:
        for B, H, D, frames, T, chunk, sink, window in cfgs:
            m = FrameMask(frames, T, chunk, sink, window)
            L = m.length
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v, do = (torch.randn(B, L, H, D, device=dev, dtype=dtype, generator=g) for _ in range(4))
            pairs = m.visible_pairs()
            fwd_flops = 4.0 * B * H * pairs * D
            for name, fn in backends.items():
                for phase in ("fwd", "fwd+bwd"):
                    row = dict(kernel="block_causal", backend=name, phase=phase, dtype=str(dtype).split(".")[-1],
                               B=B, H=H, D=D, frames=frames, tokens_per_frame=T, chunk_frames=chunk,
                               sink_frames=sink, window_frames=window, visible_pairs=B * pairs)
                    if budget.over():
                        row["skipped"] = "time budget"
                        rows.append(row)
                        budget.add(row)
                        continue
                    try:
                        if phase == "fwd":
                            def call():
                                with torch.no_grad():
                                    return fn(q, k, v, m)
                            flops = fwd_flops
                        else:
                            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                            def call():
                                out = fn(qg, kg, vg, m)
                                out.backward(do)
                            flops = 3.5 * fwd_flops
                        ms = _timer(call, cuda, reps)
                        row.update(ms=float(f"{ms:.4g}"), tflops=float(f"{flops / ms / 1e9:.4g}"))
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    rows.append(row)
                    budget.add(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON document")
    ap.add_argument("--quick", action="store_true", help="few shapes (always on without a GPU)")
    ap.add_argument("--shapes", default="auto", choices=["auto", "tiny", "quick", "full"],
                    help="auto: full on a GPU (quick with --quick), tiny without one")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no measurement starts")
    ap.add_argument("--out", default=None, help="also write the JSON here (rewritten after every row)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    shapes = args.shapes
    if shapes == "auto" or not cuda:      # without a GPU only the tiny interpreter shapes run
        shapes = "tiny" if not cuda else "quick" if args.quick else "full"
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    if not cuda:
        # interpreter: fp16/fp32 only (bf16 dots are emulated there, so bf16 says nothing)
        dtypes = [d for d in dtypes if d != torch.bfloat16] or [torch.float16]
    if shapes == "tiny":
        stream_cfgs = [(1, 2, 32, 24, 56)]
        bc_cfgs = [(1, 2, 32, 4, 12, 2, 1, 2)]
    elif shapes == "quick":
        stream_cfgs = [(1, 12, 128, 3 * WAN_T, 9 * WAN_T), (1, 12, 128, WAN_T, 21 * WAN_T)]
        bc_cfgs = [(1, 12, 128, 21, WAN_T, 3, 0, -1)]
    else:
        stream_cfgs = [(1, 12, 128, lq * WAN_T, lk * WAN_T) for lq in (3, 1) for lk in (3, 6, 12, 21) if lk >= lq]
        bc_cfgs = [(1, 12, 128, 21, WAN_T, 3, 0, -1), (1, 12, 128, 21, WAN_T, 3, 3, 9),
                   (1, 12, 128, 21, WAN_T, 1, 3, 9)]
    reps = 1 if not cuda else 0
    t0 = time.time()
    import triton
    argv_txt = sys.argv[1:] if argv is None else list(argv)

    def document(figures, complete):
        return dict(
            command=" ".join([os.path.basename(sys.executable), "-m", "streamgen.kernels.bench"] + argv_txt),
            machine=dict(host=socket.gethostname(), platform=platform.platform(), cpus=os.cpu_count(),
                         python=platform.python_version()),
            device=torch.cuda.get_device_name() if cuda else "cpu (triton interpreter)",
            torch=torch.__version__, triton=triton.__version__,
            mode=shapes, timings_meaningful=cuda, complete=complete,
            flops_rule="4*visible_pairs*D forward; fwd+bwd = 3.5x forward",
            wall_s=round(time.time() - t0, 2), figures=figures)

    def write(doc):
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps(doc) + "\n")
            os.replace(tmp, args.out)

    budget = Budget(args.budget, on_row=lambda rows: write(document(list(rows), False)))
    bench_stream(stream_cfgs, dtypes, cuda, reps, dev, budget)
    bench_block_causal(bc_cfgs, dtypes, cuda, reps, dev, budget)
    figures = budget.rows
    doc = document(figures, True)
    text = json.dumps(doc, indent=None if args.json else 2)
    write(doc)
    if not args.json:
        for r in figures:
            what = r.get("error") or r.get("skipped") or f"{r['ms']:.4g} ms  {r['tflops']:.4g} TFLOP/s"
            if r["kernel"] == "stream":
                shape = f"Lq={r['Lq']} Lk={r['Lk']}"
            else:
                shape = f"{r['frames']}x{r['tokens_per_frame']} {r['phase']}"
            print(f"# {r['kernel']:12s} {r['backend']:16s} {r['dtype']:9s} {shape:24s} {what}", file=sys.stderr)
    print(text)
    return doc


if __name__ == "__main__":
    main()
