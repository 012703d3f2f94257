"""Triton kernels of the engine (importable as ``streamgen.kernels``; importing it loads Triton).

Modules, each with the ``@triton.jit`` kernel(s), a Python wrapper that returns None for
calls it does not support, a plain PyTorch ``reference`` and a ``_test()`` self-check:

- ``stream_attention``: chunk queries vs the ring-buffer KV cache (inference; key validity
  per slot, optional in-kernel RoPE of q and cached k);
- ``block_causal``: frame block-causal attention with sink/window, forward + backward;
- ``fused_norm``: RMSNorm + interleaved 3D RoPE, LayerNorm + adaLN modulate;
- ``bench``: ``python -m streamgen.kernels.bench [--json] [--quick]``.

The engine reaches them only through ``streamgen.models.kernels_bridge`` (backend "triton": the
attention entry points of ``streamgen.models.attention`` and the model's fused norms); the kernels
import nothing of the engine but the mask structure of ``streamgen.models.masks``. On CPU they run only under ``TRITON_INTERPRET=1``, which must
be set before this package is imported.
"""
