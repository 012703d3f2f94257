"""CLI: generate writes an MP4 with exactly N frames; bad input gives one clear error line."""
import json
import os
import subprocess
import sys

import pytest

from streamgen.video import read_video


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "streamgen", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


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
    }


def test_bad_input_one_clear_error(tmp_path):
    for name, args in _bad(tmp_path).items():
        r = run(*args)
        assert r.returncode != 0, name
        assert "Traceback" not in r.stderr, (name, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, (name, r.stderr)


def test_help_and_module_entry():
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "serve" in r.stdout
