"""Optional speed paths for the chunk step: torch.compile, bf16, FP8 linears, overlapped decode.

None of this changes results beyond dtype rounding; every option is a string, "none"/"off"
being the plain eager path. Status (2026-11-23): checked on CPU only (compile with the
"aot_eager" backend equals eager, tests/test_parity_compile.py); the CUDA paths
(inductor, CUDA graphs via "reduce-overhead", torchao FP8, the side-stream decode) have
NOT been run or measured on a GPU yet.

- ``compile_chunk_step(mode)``: ``torch.compile`` of the chunk step
  (``streamgen.streaming.chunk_step``, one model call through the cache), the free function
  ``generate_chunk(..., step=...)`` runs: gpt-fast's ``decode_one_token`` habit, the model
  itself is left alone. The streaming cache has static shapes (preallocated K/V, write
  indices, validity and RoPE positions are tensors updated in place by ``begin_chunk``), so
  one graph serves every chunk of a session; "reduce-overhead" adds CUDA graphs (inductor's
  cudagraph trees). ``compile_model(model, mode)`` is the older whole-module form (torch's
  own ``nn.Module.compile``, nothing of the model is replaced), for callers that cannot pass
  a step.
- ``quantize_fp8(model, mode)``: torchao float8 dynamic-activation/weight quantisation of the
  DiT's ``nn.Linear`` layers (needs torchao and an SM89+ GPU).
- ``OverlappedDecoder``: decodes chunk i on a worker thread (and, on CUDA, a side stream)
  while the DiT generates chunk i+1.
"""
from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Callable

import torch

from .errors import ConfigError

COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
QUANT_MODES = ("none", "fp8")


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
    from .streaming import chunk_step
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


def fp8_available(device) -> tuple[bool, str]:
    """(usable, reason) for torchao FP8 on ``device``."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False, "torchao is not installed (pip install 'streamgen[fp8]')"
    dev = torch.device(device)
    if dev.type != "cuda":
        return False, "FP8 linears need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < (8, 9):
        return False, f"FP8 needs compute capability >= 8.9, this GPU has {major}.{minor}"
    return True, "ok"


def quantize_fp8(model: torch.nn.Module, mode: str = "fp8") -> torch.nn.Module:
    """Quantise the transformer blocks' linear layers to float8 (torchao), in place."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    dev = next(model.parameters()).device
    ok, why = fp8_available(dev)
    if not ok:
        raise ConfigError(f"quant 'fp8' unavailable: {why}")
    from torchao.quantization import quantize_
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as Fp8Config
        cfg = Fp8Config()
    except ImportError:  # older torchao
        from torchao.quantization import float8_dynamic_activation_float8_weight as fp8_fn
        cfg = fp8_fn()

    def only_block_linears(mod, fqn):
        return isinstance(mod, torch.nn.Linear) and fqn.startswith("blocks.")
    quantize_(model, cfg, filter_fn=only_block_linears)
    return model


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
