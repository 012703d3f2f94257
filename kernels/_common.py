"""Helpers shared by the kernels: interpreter detection, dot precision, tile choices.

Under ``TRITON_INTERPRET=1`` (CPU) two interpreter limits shape the code:
- bf16 ``tl.dot`` is silently wrong there, so bf16 operands are cast to fp32 before dots
  (``DOT_F32``); on a GPU bf16/fp16 dots run natively with fp32 accumulation;
- ``@triton.autotune`` with several configs crashes, so the wrappers launch the plain
  ``@triton.jit`` kernel with one fixed config and use the autotuned twin only on a GPU.
"""
from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether tile products run on fp32 operands (fp32 I/O, or bf16 in the interpreter)."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def head_block(d: int) -> int:
    """Padded head-dim tile (power of two, >= 16 for tl.dot)."""
    return max(16, next_pow2(d))


def runnable(*tensors: torch.Tensor) -> bool:
    """Whether Triton can run on these tensors here (CUDA, or CPU in the interpreter)."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and interpreting()
