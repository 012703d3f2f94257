"""python benchmarks/gpu/report.py OUTDIR/results.json > RESULTS.md

The GPU suite's RESULTS.md from its results.json document (standard library only). suite.py
calls ``markdown`` after every step; this command re-renders a saved document. The tables are
ready to paste into benchmarks/RESULTS.md: a header with date, GPU, driver and versions, one
row per step (status, wall time against its cap, CPU time, headline figure, the error of a
failed step), then one table per step kind.
"""
from __future__ import annotations

import json
import sys


def _f(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def headline(row: dict) -> str:
    r = row.get("result") or {}
    name = row["name"]
    if row.get("status") not in ("ok", "partial"):
        err = _cell(row.get("error", ""))[:160]
        try:                    # a failed step that still reported (kernel failures, killed runs)
            got = _headline(name, r) if r else ""
        except (KeyError, TypeError, IndexError):
            got = ""
        return "; ".join(x for x in (err, got) if x)
    if row.get("note"):
        return f"{_headline(name, r)} ({row['note']})"
    return _headline(name, r)


def _headline(name: str, r: dict) -> str:
    if name == "env":
        e = r.get("environment", {})
        return e.get("gpu") or "no GPU (CPU rehearsal)"
    if name == "kernels-correctness":
        s = r.get("summary", {})
        return f"{s.get('ok')}/{s.get('ok', 0) + s.get('failed', 0)} cases pass ({s.get('skipped')} skipped)"
    if name == "kernels-bench":
        figs = r.get("figures", [])
        tri = [f for f in figs if f["kernel"] == "stream" and f.get("backend") == "triton" and "tflops" in f]
        if not tri:
            return f"{len(figs)} rows"
        t = tri[0]
        same = [f for f in figs if f["kernel"] == "stream" and f["backend"].startswith("sdpa") and "tflops" in f
                and "rope" not in f["backend"] and (f["dtype"], f["Lq"], f["Lk"]) == (t["dtype"], t["Lq"], t["Lk"])]
        sd = max(same, key=lambda f: f["tflops"], default=None)
        vs = f" vs {sd['backend']} {_f(sd['tflops'])}" if sd else ""
        return f"stream triton {_f(t['tflops'])}{vs} TFLOP/s ({t['dtype']}, Lq {t['Lq']} x Lk {t['Lk']})"
    if name.startswith("bench-"):
        return (f"{_f(r.get('fps'))} fps, DiT {_f(r.get('dit_chunk_p50_s'))} s + decoder "
                f"{_f(r.get('decoder_chunk_p50_s'))} s per chunk")
    if name == "train-step":
        return (f"{_f(r.get('steps_per_s_gen_every_5'))} steps/s (gen every 5), generator step "
                f"{_f(r.get('generator_step_s'))} s, peak {_f(r.get('peak_memory_gb'))} GB")
    if name == "recipe":
        st = r.get("stages", [])
        return f"{sum(s.get('status') == 'ok' for s in st)}/{len(st)} stage runs ok"
    return ""


def _env_lines(doc: dict) -> list[str]:
    e, s = doc.get("environment", {}), doc.get("suite", {})
    pk = e.get("packages", {})
    have = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    missing = ", ".join(k for k, v in pk.items() if not v)
    return [f"- date: {s.get('date')}; command: `{s.get('command')}` (suite budget {_f(s.get('budget_s'))} s, "
            f"elapsed {_f(s.get('elapsed_s'))} s)",
            f"- GPU: {e.get('gpu', 'none')}" + (f" (sm {e['capability']}, {e.get('gpu_memory_gb')} GB, "
                                                 f"{e.get('sms')} SMs)" if e.get("capability") else "")
            + (f"; nvidia-smi: {e['nvidia_smi']}" if e.get("nvidia_smi") else ""),
            f"- torch {e.get('torch')} (CUDA {e.get('torch_cuda')}), Python {e.get('python')}, {e.get('cpus')} CPUs, "
            f"{e.get('platform')}",
            f"- packages: {have}" + (f"; missing: {missing}" if missing else "")]


def _kernel_tables(r: dict) -> list[str]:
    agg: dict = {}
    for c in r.get("cases", []):
        a = agg.setdefault((c["kernel"], c["dtype"]), {"ok": 0, "run": 0, "skip": 0, "worst": 0.0, "fail": []})
        if c.get("ok") is None:
            a["skip"] += 1
            continue
        a["run"] += 1
        a["ok"] += bool(c["ok"])
        if "err" in c:
            a["worst"] = max(a["worst"], c["err"] / max(c["bound"], 1e-30))
        if not c["ok"]:
            a["fail"].append(f"{c['case']}: {c.get('error') or _f(c.get('err'))}")
    rows = [[k, d, f"{a['ok']}/{a['run']}", a["skip"], _f(a["worst"], 2), "; ".join(a["fail"])[:200]]
            for (k, d), a in agg.items()]
    return [f"Rule: {r.get('rule', '')}; mode {r.get('mode')}.", "",
            table(["kernel", "dtype", "pass / run", "skipped", "worst err / bound", "failures"], rows)]


def _bench_tables(r: dict) -> list[str]:
    rows = []
    for f in r.get("figures", []):
        shape = (f"Lq {f['Lq']} × Lk {f['Lk']}" if f["kernel"] == "stream" else
                 f"{f['frames']}×{f['tokens_per_frame']}, chunk {f['chunk_frames']}, sink {f['sink_frames']}, "
                 f"window {f['window_frames']} ({f['phase']})")
        rows.append([f["kernel"], shape, f["dtype"], f["backend"], _f(f.get("ms")), _f(f.get("tflops")),
                     f.get("error") or f.get("skipped") or ""])
    note = "" if r.get("timings_meaningful") else " Timings are NOT meaningful (no GPU: Triton interpreter)."
    return [f"`{r.get('command', '')}` on {r.get('device')}; {r.get('flops_rule', '')}.{note}", "",
            table(["kernel", "shape", "dtype", "backend", "ms", "TFLOP/s", "note"], rows)]


def _pipeline_table(rows_in: list[dict]) -> list[str]:
    rows = []
    for row in rows_in:
        r = row.get("result") or {}
        if row.get("status") == "ok":
            rows.append([row["name"], f"`{row.get('command', '')}`", r.get("vae"), r.get("compile"), r.get("quant"),
                         r.get("attn_backend"), _f(r.get("fps")), _f(r.get("first_frame_latency_s")),
                         f"{_f(r.get('chunk_latency_p50_s'))} / {_f(r.get('chunk_latency_p99_s'))}",
                         _f(r.get("dit_chunk_p50_s")), _f(r.get("decoder_chunk_p50_s")), _f(r.get("dit_fps")),
                         _f(r.get("peak_memory_mb")), row.get("note", "")])
        else:
            rows.append([row["name"], f"`{row.get('command', '')}`"] + ["–"] * 11
                        + [f"{row.get('status')}: {row.get('error', '')}"[:200]])
    return [table(["variant", "command", "decoder", "compile", "quant", "attention", "fps", "first frame (s)",
                   "chunk p50 / p99 (s)", "DiT chunk p50 (s)", "decoder chunk p50 (s)", "DiT fps", "peak mem (MB)",
                   "note"], rows)]


def _train_table(r: dict) -> list[str]:
    w = r.get("warmup_generator_step", {})
    g = (r.get("generator_steps") or [w])[0]
    c = (r.get("critic_steps") or [{}])[0]
    rows = [["preset / frames / batch", f"{r.get('preset')} / {r.get('frames')} latent frames / {r.get('batch')}"],
            ["precision, checkpointing", f"{r.get('precision')}; {r.get('grad_checkpointing')}"],
            ["generator step (s): rollout w/ grad, scores, backward+AdamW, critic",
             f"{_f(g.get('total_s'))}: {_f(g.get('rollout_grad_s'))}, {_f(g.get('scores_s'))}, "
             f"{_f(g.get('generator_backward_adamw_s'))}, {_f(g.get('critic_fwd_bwd_adamw_s'))}"],
            ["critic step (s): rollout no grad, critic", f"{_f(c.get('total_s'))}: {_f(c.get('rollout_nograd_s'))}, "
                                                        f"{_f(c.get('critic_fwd_bwd_adamw_s'))}"],
            ["steps/s at gen_every 5", _f(r.get("steps_per_s_gen_every_5"))],
            ["peak GPU memory allocated / reserved (GB)",
             f"{_f(r.get('peak_memory_gb'))} / {_f(r.get('peak_reserved_gb'))}"
             + (f" (CPU run: peak RSS {_f(r['peak_rss_mb'])} MB)" if r.get("peak_rss_mb") else "")],
            ["out of memory (then retried on 9 frames)", r.get("out_of_memory", {}).get("error", "no")],
            ["timed after a warm-up step", r.get("timed_after_warmup")]]
    if "ckpt_grad_rel_diff" in r:
        rows.append(["checkpointed vs plain generator gradients (tiny, rel. diff)", _f(r["ckpt_grad_rel_diff"])])
    return [table(["item", "value"], rows), ""] + [f"- note: {n}" for n in r.get("notes", [])]


def _recipe_table(r: dict) -> list[str]:
    rows = [[s["stage"], s["device"], s.get("precision", ""), s.get("batch_size", ""), _f(s.get("steps_per_s")),
             _f(s.get("wall_s")), s["status"], s.get("error", "")[:160]] for s in r.get("stages", [])]
    sp = ", ".join(f"{k} {v}x" for k, v in r.get("gpu_over_cpu", {}).items()) or "–"
    return [table(["stage", "device", "precision", "batch", "steps/s", "wall (s)", "status", "error"], rows), "",
            f"GPU over CPU: {sp}."] + [f"- note: {n}" for n in r.get("notes", [])]


def markdown(doc: dict) -> str:
    s = doc.get("suite", {})
    e = doc.get("environment", {})
    what = ("CPU rehearsal (`--dry-run`): tiny shapes, Triton interpreter; timings are NOT GPU figures"
            if s.get("dry_run") else f"{e.get('gpu', 'GPU')}")
    out = [f"## GPU suite: {what} ({s.get('date')})", ""] + _env_lines(doc) + ["", "### Steps", ""]
    st = doc.get("steps", [])
    out.append(table(["step", "what", "status", "wall / cap (s)", "CPU (s)", "headline"],
                     [[r["name"], r["title"], r.get("status"), f"{_f(r.get('wall_s'))} / {r.get('cap_s')}",
                       _f(r.get("cpu_s")), headline(r) if r.get("status") != "pending" else ""] for r in st]))
    by = {r["name"]: r for r in st}

    def section(name, title, fn):
        r = by.get(name)
        if r and r.get("result"):
            out.extend(["", f"### {title}", ""] + fn(r["result"]))
    section("kernels-correctness", "1. Triton kernels: correctness", _kernel_tables)
    section("kernels-bench", "2. Attention kernels: speed", _bench_tables)
    bench = [r for r in st if r["name"].startswith("bench-") and r.get("status") != "pending"]
    if bench:
        out.extend(["", "### 3. Chunk step (`streamgen bench`, random weights, 4 steps)", ""] + _pipeline_table(bench))
    section("train-step", "4. Training step at real size", _train_table)
    section("recipe", "5. Default world-model recipe", _recipe_table)
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
