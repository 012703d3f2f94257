"""The GPU suite's CPU rehearsal: ``bash benchmarks/gpu/run.sh OUT --dry-run`` runs every step end
to end (tiny shapes, Triton interpreter, no GPU) and writes results.json + RESULTS.md, so a GPU
window cannot be lost to a typo. Plus: a failing, crashing or hanging step is a row, not a crash.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DIR = os.path.join(ROOT, "benchmarks", "gpu")
STEPS = ["env", "kernels-correctness", "kernels-bench", "bench-wan-vae", "bench-taehv", "bench-compile",
         "bench-cudagraphs", "bench-fp8", "train-step", "recipe", "bench-triton-attn", "bench-overlap"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", os.path.join(GPU_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _suite():
    return _load("suite")


@pytest.mark.timeout(5400)      # ~80 s on an idle 2-core machine; far longer on a busy one
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("SUITE_T0", None)
    p = subprocess.run(["bash", os.path.join(GPU_DIR, "run.sh"), str(out), "--dry-run", "--work", str(tmp_path / "w")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=5300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    md = (out / "RESULTS.md").read_text()
    assert (out / "suite.log").exists() and (out / "setup.log").exists()
    rows = {r["name"]: r for r in doc["steps"]}
    assert list(rows) == STEPS
    assert doc["suite"]["dry_run"] is True and doc["environment"]["cuda_available"] is False
    for name in STEPS:
        want = {"bench-fp8": {"unavailable"}, "recipe": {"ok", "partial"}}.get(name, {"ok"})
        assert rows[name]["status"] in want, (name, rows[name].get("error"), rows[name].get("stderr_tail"))
        assert f"| {name} |" in md
    kc = rows["kernels-correctness"]["result"]
    assert kc["summary"]["failed"] == 0 and kc["summary"]["ok"] > 0
    assert {c["kernel"] for c in kc["cases"]} == {"stream_attention", "block_causal", "rmsnorm_rope",
                                                  "layernorm_modulate"}
    assert any(c["dtype"] == "bfloat16" and c.get("skipped", "").startswith("gpu-only") for c in kc["cases"])
    kb = rows["kernels-bench"]["result"]
    assert any(f["backend"] == "triton" and f.get("ms", 0) > 0 for f in kb["figures"])
    for name in ("bench-wan-vae", "bench-taehv", "bench-compile", "bench-cudagraphs"):
        r = rows[name]["result"]
        assert r["fps"] > 0 and r["dit_chunk_p50_s"] > 0 and r["decoder_chunk_p50_s"] >= 0
    assert rows["bench-compile"]["result"]["compile"] == "default"
    assert rows["bench-cudagraphs"]["result"]["compile"] == "reduce-overhead"
    assert "fp8" in rows["bench-fp8"]["error"].lower()
    ts = rows["train-step"]["result"]
    assert ts["ckpt_grad_rel_diff"] == 0.0 and ts["steps_per_s_gen_every_5"] > 0 and ts["timed_after_warmup"]
    rc = rows["recipe"]["result"]
    cfgs = os.listdir(os.path.join(ROOT, "training", "configs", "default"))
    recipe = sorted(f[:-5] for f in cfgs if f.endswith(".yaml"))
    assert [s["stage"] for s in rc["stages"]] == recipe
    assert all(s["status"] in ("ok", "failed") for s in rc["stages"])
    assert all(s.get("steps_per_s", 0) > 0 for s in rc["stages"] if s["status"] == "ok")
    for title in ("### Steps", "### 1. Triton kernels", "### 2. Attention kernels", "### 3. Chunk step",
                  "### 4. Training step", "### 5. Default world-model recipe", "CPU rehearsal"):
        assert title in md


def test_failures_timeouts_and_crashes_are_rows(tmp_path):
    s = _suite()
    py = sys.executable
    cases = {
        "sleeps": ([py, "-c", "import time; time.sleep(60)"], "timeout"),
        "crashes": ([py, "-c", "raise SystemExit(3)"], "failed"),
        "unavailable": ([py, "-c", "import sys; print('error: quant fp8 unavailable: needs CUDA', file=sys.stderr); "
                             "sys.exit(2)"], "unavailable"),
        "reports": ([py, "-c", "print('noise'); print('{\"status\": \"ok\", \"x\": 1}')"], "ok"),
    }
    rows = []
    for name, (argv, want) in cases.items():
        row = s.run_step({"name": name, "title": name, "argv": argv}, 2, str(tmp_path), str(tmp_path / "log"),
                         dict(os.environ))
        assert row["status"] == want, row
        rows.append(row)
    assert rows[0]["wall_s"] < 30 and rows[3]["result"]["x"] == 1
    doc = {"suite": {"date": "today", "dry_run": True}, "environment": {}, "steps": rows}
    s.write_outputs(str(tmp_path), doc)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| sleeps |" in md and "timeout" in md and "killed at the 2 s cap" in md
    assert json.loads((tmp_path / "results.json").read_text())["steps"][1]["status"] == "failed"


def test_kernel_bench_budget_leaves_json(tmp_path):
    from streamgen.kernels import bench
    out = tmp_path / "kb.json"
    doc = bench.main(["--json", "--budget", "0", "--out", str(out)])
    assert doc["figures"] and all(f.get("skipped") == "time budget" for f in doc["figures"])
    assert json.loads(out.read_text())["complete"] is True


def test_gpu_commands_parse(tmp_path):
    """Every command of the GPU (not dry) plan is accepted by its program's own argument parser."""
    from streamgen.cli import build_parser
    from streamgen.kernels import bench
    s = _suite()
    parsers = {f"{m}.py": _load(m).build_parser() for m in ("kernel_check", "train_step", "recipe")}
    parsers["streamgen.kernels.bench"] = bench.build_parser()
    plan = s.steps(False, sys.executable, str(tmp_path))
    assert [st["name"] for st in plan] == STEPS and sum(st["cap"] for st in plan if not st.get("optional")) <= 475
    for st in plan:
        argv = st["argv"][1:] + (["--budget", "30"] if st.get("budget") else [])
        argv += ["--out", "x"] if st.get("out") else []
        if argv[:2] == ["-m", "streamgen"]:
            args = build_parser().parse_args(argv[2:])
            assert args.cmd == "bench" and args.device == "cuda" and args.dtype == "bfloat16" and args.height == 480
        elif argv[:2] == ["-m", "streamgen.kernels.bench"]:
            parsers["streamgen.kernels.bench"].parse_args(argv[2:])
        elif os.path.basename(argv[0]) == "suite.py":
            assert argv[1:] == ["--probe"]
        else:
            parsers[os.path.basename(argv[0])].parse_args(argv[1:])
