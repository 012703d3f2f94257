"""Bit-reproducibility across processes: the same seed gives the same MP4 bytes.

Two fresh processes differ in what their heap holds before the encoder allocates its
buffers. libx264's macroblock-tree rate control read memory it never initialised (for
these small frames), so the first GOP of a file depended on that leftover memory: identical
frames, different bytes (up to 9/255 after decoding). The subprocesses here make the
difference explicit: each fills freed heap chunks with its own byte pattern right before
``av.open`` (what both MP4 writers call first), then runs the real command.
"""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from streamgen.io.video import read_video

# Runs `python -c HARNESS FILL streamgen-args...`: pollute the heap with FILL bytes just before
# each av.open, then run the CLI.
HARNESS = r"""
import ctypes, sys
import av
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
fill = int(sys.argv[1])

def pollute():
    ptrs = []
    for size in [16 << (i // 8) for i in range(8 * 15)]:      # 16 B .. 256 KiB, 8 of each
        p = libc.malloc(size)
        ctypes.memset(p, fill, size)
        ptrs.append(p)
    for p in reversed(ptrs):
        libc.free(p)

_open = av.open
def open_polluted(*a, **k):
    pollute()
    return _open(*a, **k)
av.open = open_polluted
from streamgen.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_polluted(fill: int, *args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", HARNESS, str(fill), *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_same_video(a, b):
    if digest(a) != digest(b):
        va, vb = read_video(str(a)).astype(int), read_video(str(b)).astype(int)
        diff = [int(np.abs(x - y).max()) for x, y in zip(va, vb)] if va.shape == vb.shape else None
        pytest.fail(f"same seed, different files across processes; per-frame max |diff|: {diff}")


@pytest.mark.parametrize("model", ["default", "tiny-world"])
def test_generate_is_bit_reproducible_across_processes(tmp_path, model):
    extra = ["--random-weights"] if model != "default" else []
    outs = []
    for fill in (0x00, 0xA5):
        out = tmp_path / f"{model}-{fill}.mp4"
        run_polluted(fill, "generate", "--model", model, *extra, "--prompt", "a stone maze at dusk",
                     "--frames", "9", "--seed", "7", "--out", str(out))
        outs.append(out)
    assert read_video(str(outs[0])).shape[0] == 9
    assert_same_video(*outs)


def test_world_record_is_bit_reproducible_across_processes(tmp_path):
    outs = []
    for fill in (0x00, 0xA5):
        out = tmp_path / f"world-{fill}.mp4"
        run_polluted(fill, "world", "record", "--seed", "0", "--frames", "24", "--out", str(out))
        outs.append(out)
    assert read_video(str(outs[0])).shape[0] == 24
    assert_same_video(*outs)


def test_mp4_writer_is_bit_reproducible_across_processes(tmp_path):
    """The encoder alone: fixed frames -> the same bytes whatever the heap held before."""
    code = HARNESS.replace("from streamgen.cli import main\nsys.exit(main(sys.argv[2:]))", r"""
from streamgen.io.video import write_mp4
from streamgen.world.episodes import generate_clip
frames = generate_clip(0, 24, 64, policy="human")["frames"]                   # uint8 [24, 64, 64, 3]
write_mp4(sys.argv[2], frames, fps=16)
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = []
    for fill in (0x00, 0x5A, 0xFF):
        out = tmp_path / f"w-{fill}.mp4"
        r = subprocess.run([sys.executable, "-c", code, str(fill), str(out)], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out)
    for other in outs[1:]:
        assert_same_video(outs[0], other)
