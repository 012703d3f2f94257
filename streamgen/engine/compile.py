"""torch.compile of the chunk step (the speed option that changes nothing but time).

Every option is a string, "none" being the plain eager path. Status (2026-11-23): checked on
CPU only (compile with the "aot_eager" backend equals eager, tests/test_parity_compile.py);
the CUDA paths (inductor, CUDA graphs via "reduce-overhead") have NOT been run or measured
on a GPU yet. The other speed options live next to it: FP8 linears in
:mod:`streamgen.engine.fp8`, the overlapped decode thread in
:mod:`streamgen.engine.overlapped_decode`.

- ``compile_chunk_step(mode)``: ``torch.compile`` of the chunk step
  (``streamgen.engine.chunk_step.chunk_step``, one model call through the cache), the free
  function ``generate_chunk(..., step=...)`` runs: gpt-fast's ``decode_one_token`` habit, the
  model itself is left alone. The streaming cache has static shapes (preallocated K/V, write
  indices, validity and RoPE positions are tensors updated in place by ``begin_chunk``), so
  one graph serves every chunk of a session; "reduce-overhead" adds CUDA graphs (inductor's
  cudagraph trees). ``compile_model(model, mode)`` is the older whole-module form (torch's
  own ``nn.Module.compile``, nothing of the model is replaced), for callers that cannot pass
  a step.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import ConfigError

COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


def _compile_kwargs(mode: str, backend: str, dynamic: bool) -> dict[str, Any]:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    kw: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if backend == "inductor":
        kw["mode"] = mode
    return kw


def compile_chunk_step(mode: str = "default", backend: str = "inductor", dynamic: bool = False) -> Callable:
    """The chunk step for ``generate_chunk(..., step=...)``: compiled, or the plain
    ``chunk_step`` for mode "none". ``mode`` in COMPILE_MODES."""
    from .chunk_step import chunk_step
    kw = _compile_kwargs(mode, backend, dynamic)
    return chunk_step if mode == "none" else torch.compile(chunk_step, **kw)


def compile_model(model: torch.nn.Module, mode: str = "default", backend: str = "inductor",
                  dynamic: bool = False) -> torch.nn.Module:
    """Compile the module's calls in place with ``nn.Module.compile`` (returns the model; its
    ``forward`` is not replaced). Prefer :func:`compile_chunk_step`. ``mode`` in COMPILE_MODES."""
    kw = _compile_kwargs(mode, backend, dynamic)
    if mode != "none":
        model.compile(**kw)
    return model
