"""Overlapped decode: decode chunk i on a worker thread (and, on CUDA, a side stream)
while the DiT generates chunk i+1.

Status (2026-11-23): the CPU thread path is tested (tests/test_parity_compile.py); the CUDA
side-stream path has NOT been run on a GPU yet.
"""
from __future__ import annotations

import concurrent.futures as cf

import torch


class OverlappedDecoder:
    """Decode chunks on a worker thread (CUDA: its own stream) while the DiT runs.

        dec = OverlappedDecoder(vae, to_uint8)
        fut = dec.submit(x0, state)      # returns at once; fut.result() -> (uint8 frames, state)
    """

    def __init__(self, vae, to_uint8, device="cpu"):
        self.vae, self.to_uint8 = vae, to_uint8
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamgen-decode")

    def _work(self, x0, state, ready):
        if self.stream is None:
            with torch.no_grad():
                frames, state = self.vae.decode_chunk(x0, state)
                return self.to_uint8(frames[0]), state
        with torch.cuda.stream(self.stream), torch.no_grad():
            self.stream.wait_event(ready)                      # x0 is complete on the main stream
            x0.record_stream(self.stream)
            frames, state = self.vae.decode_chunk(x0, state)
            out = self.to_uint8(frames[0])                     # .cpu() syncs this stream only
            return out, state

    def submit(self, x0: torch.Tensor, state) -> cf.Future:
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        return self.pool.submit(self._work, x0, state, ready)

    def close(self):
        self.pool.shutdown(wait=True)
