"""CLI: generate writes an MP4 with exactly N frames; bad input gives one clear error line."""
import json
import os
import subprocess
import sys

import pytest

from streamgen.io.video import read_video


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "streamgen", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_here(capsys, *args):
    """The CLI in this process (no interpreter start-up): -> (exit code, stdout, stderr)."""
    from streamgen.cli import main
    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("frames", [1, 7, 20])
def test_generate_writes_exact_frames(tmp_path, frames):
    out = tmp_path / "v.mp4"
    r = run("generate", "--model", "tiny", "--random-weights", "--frames", str(frames),
            "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "frames/s" in r.stdout and "first-frame latency" in r.stdout
    assert "RANDOM WEIGHTS" in r.stderr  # never pretends to be a trained model
    video = read_video(str(out))
    assert video.shape == (frames, 64, 64, 3)


def test_generate_with_actions_and_prompt_switch(tmp_path):
    acts = tmp_path / "a.jsonl"
    acts.write_text("\n".join(json.dumps({"keys": ["W"] if i % 2 else ["A", "D"], "mouse": [0.1, 0.0]})
                              for i in range(9)))
    out = tmp_path / "v.mp4"
    r = run("generate", "--model", "tiny-world", "--random-weights", "--frames", "9", "--actions", str(acts),
            "--switch-prompt", "6:an ice cave", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert read_video(str(out)).shape[0] == 9


def test_bench_json():
    r = run("bench", "--model", "tiny", "--random-weights", "--frames", "12", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("fps", "first_frame_latency_s", "chunk_latency_p50_s", "chunk_latency_p99_s",
                "peak_memory_mb", "device", "dtype", "attn_backend", "dit_chunk_p50_s", "decoder_chunk_p50_s"):
        assert key in res
    assert res["fps"] > 0 and res["trained"] is False


def _bad(tmp_path):
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    pickle = tmp_path / "bad.pt"
    pickle.write_bytes(os.urandom(300))
    malformed = tmp_path / "m.jsonl"
    malformed.write_text('{"keys": ["W"]}\n{not json\n')
    wrong = tmp_path / "w.jsonl"
    wrong.write_text('{"keys": ["Q"]}\n')
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    base = ["--frames", "3", "--out", str(tmp_path / "o.mp4")]
    return {
        "unknown preset": ["generate", "--model", "no-such-preset", *base],
        "preset without weights": ["generate", "--model", "tiny", *base],
        "negative frames": ["generate", "--model", "tiny", "--random-weights", "--frames", "-4"],
        "malformed actions": ["generate", "--model", "tiny-world", "--random-weights", "--actions", str(malformed), *base],
        "wrong keys": ["generate", "--model", "tiny-world", "--random-weights", "--actions", str(wrong), *base],
        "corrupt safetensors": ["generate", "--model", str(corrupt), "--config", "tiny", *base],
        "corrupt pickle": ["generate", "--model", str(pickle), "--config", "tiny", *base],
        "bad backend": ["generate", "--model", "tiny", "--random-weights", "--attn-backend", "cudnn9", *base],
        "empty prompt": ["generate", "--model", "tiny", "--random-weights", "--prompt", "  ", *base],
        "switch after the end": ["generate", "--model", "tiny", "--random-weights", "--frames", "8",
                                 "--switch-prompt", "100:foo"],
        "empty actions file": ["generate", "--model", "tiny-world", "--random-weights", "--actions", str(empty), *base],
        "bad option value": ["generate", "--frames", "many"],
        "world: wrong keys": ["world", "record", "--out", str(tmp_path / "r.mp4"), "--actions", str(wrong)],
        "world: empty actions": ["world", "record", "--out", str(tmp_path / "r.mp4"), "--frames", "4",
                                 "--actions", str(empty)],
    }


def test_bad_input_one_clear_error(tmp_path, capsys):
    for name, args in _bad(tmp_path).items():
        rc, _, err = run_here(capsys, *args)
        assert rc == 2, (name, rc, err)                                # the same code for every bad input
        assert "Traceback" not in err, (name, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, (name, err)
        if name.startswith("world"):
            assert "model" not in lines[0], lines[0]                  # the world has no model


def test_bad_input_refused_before_loading(tmp_path, capsys):
    """Prompt, --switch-prompt range, --start and the actions file are checked before the model loads:
    the model named here does not exist, yet the error is about the input."""
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    base = ["generate", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o.mp4")]
    cases = {"--prompt": ["--prompt", ""], "--switch-prompt": ["--frames", "8", "--switch-prompt", "100:foo"],
             "actions file": ["--actions", str(empty)], "--start": ["--start", str(tmp_path / "x.png")]}
    for want, extra in cases.items():
        rc, _, stderr = run_here(capsys, *base, *extra)
        assert rc == 2, stderr
        err = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "no-such-model" not in err[0], (want, stderr)


def test_help_and_module_entry():
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "serve" in r.stdout
