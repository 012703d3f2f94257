"""FP8 linears: torchao float8 dynamic-activation/weight quantisation of the DiT's
``nn.Linear`` layers in the transformer blocks (needs torchao and an SM89+ GPU).

Status (2026-11-23): NOT run or measured on a GPU yet; on CPU only the refusals are tested.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

QUANT_MODES = ("none", "fp8")


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
