"""Video files with PyAV: H.264 MP4 writing (whole files or incrementally) and reading.

Writing is bit-reproducible: the same frames give the same file bytes in any process.
libx264's macroblock-tree rate control (on by default) reads memory it never initialised
for small frames such as 64x64, so the first GOP of a file depended on what the process's
heap happened to hold (decoded pixels up to 9/255 apart between runs with the same seed);
:func:`x264_options` turns it off and pins x264 to one thread (its output also depends on
its thread count, which "auto" takes from the machine's core count).
"""
from __future__ import annotations

import fractions
from typing import Iterable

import numpy as np


def x264_options(crf: int = 18, preset: str = "veryfast") -> dict[str, str]:
    """libx264 options of every MP4 streamgen writes: deterministic output (see the module doc)."""
    return {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "mbtree=0"}


class Mp4Writer:
    """Incremental H.264 writer: ``w.write(frames uint8 [T, H, W, 3])`` ... ``w.close()``."""

    def __init__(self, path: str, fps: int, width: int, height: int, crf: int = 18):
        import av
        self.container = av.open(path, mode="w")
        self.stream = self.container.add_stream("libx264", rate=fractions.Fraction(fps, 1))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = x264_options(crf)
        self.frames = 0

    def write(self, frames: np.ndarray):
        import av
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            for pkt in self.stream.encode(vf):
                self.container.mux(pkt)
            self.frames += 1

    def close(self):
        for pkt in self.stream.encode():
            self.container.mux(pkt)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_mp4(path: str, frames: Iterable[np.ndarray] | np.ndarray, fps: int = 16) -> int:
    """Write uint8 frames [T, H, W, 3] (or an iterable of such blocks) to an MP4; returns T."""
    blocks = [frames] if isinstance(frames, np.ndarray) else list(frames)
    h, w = blocks[0].shape[-3:-1]
    with Mp4Writer(path, fps, w, h) as wr:
        for b in blocks:
            wr.write(b if b.ndim == 4 else b[None])
    return wr.frames


def read_video(path: str) -> np.ndarray:
    """Decode every frame of a video file: uint8 [T, H, W, 3]."""
    import av
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
