"""Video files with PyAV: H.264 MP4 writing (whole files or incrementally) and reading."""
from __future__ import annotations

import fractions
from typing import Iterable

import numpy as np


class Mp4Writer:
    """Incremental H.264 writer: ``w.write(frames uint8 [T, H, W, 3])`` ... ``w.close()``."""

    def __init__(self, path: str, fps: int, width: int, height: int, crf: int = 18):
        import av
        self.container = av.open(path, mode="w")
        self.stream = self.container.add_stream("libx264", rate=fractions.Fraction(fps, 1))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
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
