"""python benchmarks/gpu/kernel_check.py [--tiny] [--dtypes bf16,fp16] [--ragged N] [--budget S] [--seed 0]

Correctness of every Triton kernel against its PyTorch reference, with flash-attention's rule:
``max|kernel - fp64 truth| <= 2 * max|torch in the same dtype - fp64 truth| + floor``
(for the block-causal kernel: the output and all three gradients). Prints one JSON document.

GPU (default): bf16 and fp16 at the Wan2.1-1.3B shapes (12 heads x 128, 1,560 tokens per
latent frame: a 3-frame chunk against a full 21-frame cache, a frame against a wrapped
sink+ring cache with in-kernel RoPE, block-causal training attention over 6 frames, the fused
norms at width 1,536) with pinned tiles, then ``--ragged`` random ragged shapes per
kernel with (64, 64) tiles, then the real attention shapes again through the autotuned launch
the engine uses (last: autotuning compiles every config, the costliest part). Pinned tiles
keep Triton compiles few, so the whole check fits a ~45 s cap. The fp64 truth is computed one
head at a time, so memory stays a few GB.

``--tiny`` (CPU, ``TRITON_INTERPRET=1``; what the suite's dry run uses): fp32 and fp16, the
real cases shrunk to tiny T/H/D (same frame structure, RoPE, sink and ring) plus one ragged
shape per kernel; bf16 rows are reported as skipped, GPU-only, because the interpreter's bf16
``tl.dot`` is wrong. ``--budget S``: no case starts after S seconds (the rest are "skipped" rows).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel is defined

from streamgen.models.attention import FrameMask  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
WAN_T, WAN_H, WAN_D = 1560, 12, 128


def _name(dtype):
    return str(dtype).split(".")[-1]


def rule(got, truth, same, dtype) -> dict:
    err = (got.double() - truth).abs().max().item()
    err_pt = (same.double() - truth).abs().max().item()
    bound = 2 * err_pt + FLOOR[dtype]
    return {"err": float(f"{err:.3g}"), "err_torch": float(f"{err_pt:.3g}"), "bound": float(f"{bound:.3g}"),
            "ok": bool(err <= bound)}


def ring_valid(B, T, sink, anchor, ring, seen, chunk, dev):
    """key_valid [B, (sink+anchor+ring)*T]: row b has seen ``seen[b]`` frames before this chunk."""
    n = sink + anchor + ring
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        end = seen[b] + chunk
        for f in range(end):
            if f < sink:
                valid[b, f] = True
            elif f >= end - ring:
                valid[b, sink + anchor + (f - sink) % ring] = True
        if anchor and seen[b]:
            valid[b, sink] = True
    return valid.repeat_interleave(T, 1).to(dev)


def _rope(B, L, D, g, dev):
    ang = torch.rand(B, L, D // 2, generator=g) * 20.0
    return ang.cos().to(dev), ang.sin().to(dev)


def _per_head(fn, *xs):
    """Run ``fn`` on one head at a time (tensors [B, L, H, D]) and concatenate along heads."""
    H = xs[0].shape[2]
    return torch.cat([fn(*(x[:, :, h:h + 1] for x in xs)) for h in range(H)], dim=2)


# ------------------------------------------------------------------ cases
def check_stream(case, dtype, dev):
    from streamgen.kernels import stream_attention as sa
    B, H, D, T, sink, anchor, ring, chunk, seen, block, rope = (case[k] for k in (
        "B", "H", "D", "T", "sink", "anchor", "ring", "chunk", "seen", "block", "rope"))
    g = torch.Generator().manual_seed(case["seed"])
    valid = ring_valid(B, T, sink, anchor, ring, seen, chunk, dev)
    S, Lq = valid.shape[1], chunk * T
    q = torch.randn(B, Lq, H, D, generator=g).to(dev, dtype)
    k, v = (torch.randn(B, S, H, D, generator=g).to(dev, dtype) for _ in range(2))
    k_rope = _rope(B, S, D, g, dev) if rope in ("k", "qk") else None
    q_rope = _rope(B, Lq, D, g, dev) if rope == "qk" else None
    out = sa.stream_attention(q, k, v, valid, k_rope=k_rope, q_rope=q_rope, block=block)
    if out is None:
        raise RuntimeError("kernel declined the call (returned None)")

    def ref(dt):
        return _per_head(lambda a, b, c: sa.reference(a, b, c, valid, k_rope, q_rope, dtype=dt), q, k, v)
    return rule(out, ref(torch.float64), ref(dtype), dtype)


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def check_block_causal(case, dtype, dev):
    from streamgen.kernels import block_causal as bc
    B, H, D, block = case["B"], case["H"], case["D"], case["block"]
    g = torch.Generator().manual_seed(case["seed"])
    if case.get("full"):
        st, Lq, Lk = None, case["Lq"], case["Lk"]
    else:
        st = FrameMask(case["frames"], case["T"], case["chunk"], case["sink"], case["window"])
        Lq = Lk = st.length
    q = torch.randn(B, Lq, H, D, generator=g).to(dev, dtype)
    k, v = (torch.randn(B, Lk, H, D, generator=g).to(dev, dtype) for _ in range(2))
    do = torch.randn(B, Lq, H, D, generator=g).to(dev, dtype)
    mode = "full" if st is None else "block_causal"
    got = _fwd_bwd(lambda a, b, c: bc.block_causal_attention(a, b, c, st, mode=mode, block=block), q, k, v, do)

    def ref(dt):
        heads = [_fwd_bwd(lambda a, b, c: bc.reference(a, b, c, st, dtype=dt),
                          *(x[:, :, h:h + 1] for x in (q, k, v, do))) for h in range(H)]
        return [torch.cat([hd[i] for hd in heads], dim=2) for i in range(4)]
    truth, same = ref(torch.float64), ref(dtype)
    parts = {n: rule(a, t, s, dtype) for n, a, t, s in zip(("out", "dq", "dk", "dv"), got, truth, same)}
    worst = max(parts.values(), key=lambda r: r["err"] / r["bound"])
    return dict(worst, ok=all(r["ok"] for r in parts.values()),
                parts={n: {"err": r["err"], "bound": r["bound"]} for n, r in parts.items()})


def check_rmsnorm_rope(case, dtype, dev):
    from streamgen.kernels import fused_norm as fn
    B, F, T, H, D = (case[k] for k in ("B", "F", "T", "H", "D"))
    g = torch.Generator().manual_seed(case["seed"])
    x = (torch.randn(B, F * T, H * D, generator=g) * 3).to(dev, dtype)
    w = (torch.rand(H * D, generator=g) + 0.5).to(dev)
    cos, sin = _rope(B, F * T, D, g, dev)
    out = fn.rmsnorm_rope(x, w, cos, sin, H)
    if out is None:
        raise RuntimeError("kernel declined the call (returned None)")
    return rule(out, fn.rmsnorm_rope_reference(x, w, cos, sin, H, dtype=torch.float64),
                fn.rmsnorm_rope_reference(x, w, cos, sin, H, dtype=dtype), dtype)


def check_layernorm_modulate(case, dtype, dev):
    from streamgen.kernels import fused_norm as fn
    B, F, T, dim = (case[k] for k in ("B", "F", "T", "dim"))
    g = torch.Generator().manual_seed(case["seed"])
    x = (torch.randn(B, F * T, dim, generator=g) * 4 + 1).to(dev, dtype)
    shift, scale = (torch.randn(B, F, dim, generator=g).to(dev, dtype) for _ in range(2))
    out = fn.layernorm_modulate(x, shift, scale)
    if out is None:
        raise RuntimeError("kernel declined the call (returned None)")
    return rule(out, fn.layernorm_modulate_reference(x, shift, scale, dtype=torch.float64),
                fn.layernorm_modulate_reference(x, shift, scale, dtype=dtype), dtype)


CHECKS = {"stream_attention": check_stream, "block_causal": check_block_causal,
          "rmsnorm_rope": check_rmsnorm_rope, "layernorm_modulate": check_layernorm_modulate}


# ------------------------------------------------------------------ case lists
def real_cases(pinned=True):
    """The Wan2.1-1.3B shapes (GPU). Pinned tiles come from each kernel's own autotune list
    (stream (128, 64); block-causal (64, 64), also a backward config); unpinned = autotuned."""
    w = dict(B=1, H=WAN_H, D=WAN_D, T=WAN_T, block=(128, 64) if pinned else None, seed=0)
    wb = dict(w, block=(64, 64) if pinned else None)
    return [
        ("stream_attention", "wan: 3-frame chunk vs full 21-frame cache", dict(w, sink=0, anchor=0, ring=21, chunk=3,
                                                                              seen=(18,), rope="none")),
        ("stream_attention", "wan: frame vs sink 3 + wrapped ring 9, k RoPE in kernel",
         dict(w, sink=3, anchor=0, ring=9, chunk=1, seen=(40,), rope="k")),
        ("block_causal", "wan: 6 frames, chunk 3, causal (fwd+bwd)", dict(wb, frames=6, chunk=3, sink=0, window=-1)),
        ("block_causal", "wan: 6 frames, frame-wise, sink 1 + window 3 (fwd+bwd)",
         dict(wb, frames=6, chunk=1, sink=1, window=3)),
        ("rmsnorm_rope", "wan: q/k norm + RoPE, 3 frames x 1560, width 1536", dict(B=1, F=3, T=WAN_T, H=WAN_H, D=WAN_D,
                                                                                  seed=0)),
        ("layernorm_modulate", "wan: LayerNorm + adaLN, 3 frames x 1560, width 1536",
         dict(B=1, F=3, T=WAN_T, dim=WAN_H * WAN_D, seed=0)),
    ]


def shrink(case: dict) -> dict:
    """A real case at interpreter size: same structure (frames, chunk, sink, ring, RoPE), tiny T/H/D."""
    c = dict(case)
    c.update({k: v for k, v in (("T", 5 + case.get("T", 0) % 3), ("H", min(case.get("H", 1), 2)), ("D", 16),
                                ("dim", 48)) if k in case})
    if c.get("block") is not None:
        c["block"] = (16, 16)
    return c


def tiny_cases():
    """The real cases shrunk for the interpreter (CPU dry run): the GPU case list itself is exercised."""
    return [(k, "tiny: " + label, shrink(c)) for k, label, c in real_cases()]


def ragged_cases(n, seed, gpu):
    """n random ragged shapes per kernel (pinned tiles, so no autotuning per shape)."""
    rnd = random.Random(seed)
    tiles = [(64, 64)] if gpu else [(16, 16)]
    Ds = [64, 128] if gpu else [16, 32]
    Tmax = 700 if gpu else 9
    out = []
    for i in range(n):
        chunk = rnd.choice([1, 2, 3])
        ring = rnd.randint(chunk, chunk + 4)
        B = rnd.choice([1, 2])
        out.append(("stream_attention", f"ragged {i}", dict(
            B=B, H=rnd.randint(1, 3), D=rnd.choice(Ds), T=rnd.randint(3, Tmax), sink=rnd.randint(0, 2),
            anchor=rnd.randint(0, 1), ring=ring, chunk=chunk, seen=tuple(rnd.randint(0, 30) for _ in range(B)),
            rope=rnd.choice(["none", "k", "qk"]), block=rnd.choice(tiles), seed=100 + i)))
        if i % 3 == 2:
            lq, lk = rnd.randint(5, 4 * Tmax), rnd.randint(5, 4 * Tmax)
            bc = dict(full=True, Lq=lq, Lk=lk)
        else:
            bc = dict(frames=rnd.randint(2, 5), T=rnd.randint(3, Tmax), chunk=rnd.choice([1, 2]),
                      sink=rnd.randint(0, 1), window=rnd.choice([-1, 2, 3]))
        out.append(("block_causal", f"ragged {i}" + (" (mode full, Lq != Lk)" if bc.get("full") else ""),
                    dict(bc, B=1, H=rnd.randint(1, 2), D=rnd.choice(Ds), block=rnd.choice(tiles), seed=200 + i)))
        H, D = rnd.randint(1, 4), rnd.choice(Ds)
        out.append(("rmsnorm_rope", f"ragged {i}", dict(B=rnd.choice([1, 2]), F=rnd.randint(1, 3),
                                                        T=rnd.randint(3, Tmax), H=H, D=D, seed=300 + i)))
        out.append(("layernorm_modulate", f"ragged {i}", dict(B=rnd.choice([1, 2]), F=rnd.randint(1, 3),
                                                              T=rnd.randint(3, Tmax), dim=rnd.choice([48, 72, 1536]),
                                                              seed=400 + i)))
    return out


def _shape(case: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in case.items() if k != "seed"}


def run_case(kernel, label, case, dtype, dev, gpu, interp, budget, t0) -> dict:
    row = dict(kernel=kernel, case=label, dtype=_name(dtype), shape=_shape(case))
    if dtype == torch.bfloat16 and interp:
        row.update(ok=None, skipped="gpu-only: the interpreter's bf16 tl.dot is wrong")
    elif budget is not None and time.time() - t0 > budget:
        row.update(ok=None, skipped="time budget")
    else:
        t1 = time.time()
        try:
            row.update(CHECKS[kernel](case, dtype, dev))
        except Exception as e:      # a case that cannot run is a failed row, not a crash
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        row["seconds"] = round(time.time() - t1, 2)
    print(f"# {kernel:18s} {row['dtype']:9s} {label:58s} "
          f"{row.get('skipped') or row.get('error') or ('ok' if row['ok'] else 'FAIL')}"
          + (f"  err {row['err']:.3g} <= {row['bound']:.3g}" if "err" in row else ""), file=sys.stderr)
    return row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="interpreter shapes (always on without a GPU)")
    ap.add_argument("--dtypes", default=None, help="default: bf16,fp16 on a GPU, fp32,fp16 in the interpreter")
    ap.add_argument("--ragged", type=int, default=None, help="random ragged shapes per kernel (GPU 3, tiny 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no case starts")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    gpu = torch.cuda.is_available()
    tiny = args.tiny or not gpu
    dev = "cuda" if gpu else "cpu"
    names = (args.dtypes or ("fp32,fp16" if tiny else "bf16,fp16")).split(",")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    n_ragged = args.ragged if args.ragged is not None else (1 if tiny else 3)
    autotuned = [(k, label + " [autotuned]", c) for k, label, c in real_cases(pinned=False)
                 if k in ("stream_attention", "block_causal")]
    gpu_plan = real_cases() + ragged_cases(3, args.seed, True) + autotuned     # built (and so checked) always
    groups = [tiny_cases() if tiny else real_cases(), ragged_cases(n_ragged, args.seed, gpu and not tiny)]
    if not tiny:       # the engine's autotuned launch at the real attention shapes, last (compiles most)
        groups.append(autotuned)
    t0 = time.time()
    rows = []
    for group in groups:
        for dname in names:
            dtype = DTYPES[dname]
            for kernel, label, case in group:
                rows.append(run_case(kernel, label, case, dtype, dev, gpu, interp, args.budget, t0))
    n_ok = sum(r["ok"] is True for r in rows)
    n_fail = sum(r["ok"] is False for r in rows)
    import triton
    doc = dict(tool="kernel_check", command="python benchmarks/gpu/kernel_check.py " + " ".join(
        sys.argv[1:] if argv is None else argv),
        device=torch.cuda.get_device_name() if gpu else "cpu (triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, mode="tiny" if tiny else "real+ragged",
        rule="max|kernel - fp64| <= 2 * max|torch same dtype - fp64| + floor " + json.dumps(
            {_name(k): v for k, v in FLOOR.items()}),
        summary=dict(total=len(rows), ok=n_ok, failed=n_fail, skipped=len(rows) - n_ok - n_fail),
        gpu_plan_cases_per_dtype=len(gpu_plan),
        status="ok" if n_fail == 0 else "failed", wall_s=round(time.time() - t0, 2), cases=rows)
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
