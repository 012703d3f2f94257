"""Reading and writing weights safely (safetensors, or torch.load(weights_only=True)).

Understands Self-Forcing-family training checkpoints (``{"generator_ema"|"generator"|
"model": {"model.<key>": tensor}}``), plain Wan2.1 state dicts (``.safetensors``/``.pth``,
sharded with an index JSON), diffusers ``WanTransformer3DModel`` files/directories (renamed
to Wan2.1 names on load, streamgen.io.convert), and streamgen's own release files (safetensors
whose metadata carries the pipeline config as JSON under ``streamgen_config``).

``load_checkpoint(path, config=None)`` is the one entry point: it returns the DiT weights in
Wan2.1 names plus the pipeline config to run them with (explicit ``config`` > release
metadata > a streamgen ``config.json`` > family guessed from the file name > Self-Forcing's
defaults), the model shape read from a Wan/diffusers ``config.json`` or the tensors (an
explicit ``config`` keeps its settings but takes the model shape from the checkpoint).
Every failure is a one-line ``CheckpointError``.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

WRAPPER_KEYS = ("generator_ema", "generator", "model", "state_dict", "module")
CONFIG_KEY = "streamgen_config"


def _load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None


def _load_pickle(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        unsupported = [ln for ln in lines if "Unsupported global" in ln]
        if unsupported:
            raise CheckpointError(f"{path}: refused to unpickle objects other than tensors and containers "
                                  f"(weights_only=True): {unsupported[0][:160]}") from None
        detail = [ln for ln in lines if "Unsupported operand" in ln or "invalid load key" in ln]
        msg = (detail or lines or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {msg})") from None


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint file or sharded directory, plus any metadata."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        return _read_dir(path)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.endswith(".json"):
        return _read_index(path)
    obj = _load_pickle(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj, {}


def _read_index(index_path: str):
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({type(e).__name__}: {e})") from None
    out: dict[str, torch.Tensor] = {}
    root = os.path.dirname(index_path)
    for s in shards:
        shard = os.path.join(root, s)
        if not os.path.exists(shard):
            raise CheckpointError(f"{index_path}: shard {s!r} is missing")
        sd, _ = read_weights(shard)
        out.update(sd)
    absent = sorted(k for k in weight_map if k not in out)
    if absent:
        raise CheckpointError(f"{index_path}: {len(absent)} tensor(s) listed in the index are not in their "
                              f"shards, e.g. {absent[:3]}")
    return out, {}


# Files of a Wan2.1 / diffusers model directory that are not the DiT.
_NOT_DIT = ("vae", "autoencoder", "t5", "umt5", "clip", "text_encoder", "tokenizer", "optimizer",
            "teacher", "critic")   # a release folder also ships its teacher: never merged into the student


def _read_dir(path: str):
    names = sorted(os.listdir(path))
    if "transformer" in names and os.path.isdir(os.path.join(path, "transformer")):
        return _read_dir(os.path.join(path, "transformer"))          # diffusers pipeline layout
    idx = [n for n in names if n.endswith(".index.json")]
    if idx:
        return _read_index(os.path.join(path, idx[0]))
    files = [n for n in names if n.endswith((".safetensors", ".pth", ".pt", ".bin"))
             and not any(tag in n.lower() for tag in _NOT_DIT)]
    if not files:
        raise CheckpointError(f"{path}: no DiT weight files (.safetensors/.pth/.pt) found")
    out, meta = {}, {}
    for n in files:
        sd, m = read_weights(os.path.join(path, n))
        out.update(sd)
        meta.update(m)
    return out, meta


def unwrap_state_dict(obj: dict[str, Any], prefer: str | None = None) -> dict[str, torch.Tensor]:
    """Pick the generator weights out of a training checkpoint and strip ``model.``."""
    keys = ([prefer] if prefer else []) + list(WRAPPER_KEYS)
    for k in keys:
        if k in obj and isinstance(obj[k], dict):
            return unwrap_state_dict(obj[k])
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found; top-level keys: {sorted(map(str, obj))[:8]}")
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if others and len(others) >= len(tensors):
        raise CheckpointError(f"not a state dict: {len(others)} of {len(obj)} entries are not tensors, "
                              f"e.g. {others[:3]}")
    for prefix in ("model.", "module.", "_orig_mod.", "model._orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def check_and_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint",
                   fresh: tuple[str, ...] = ()):
    """load_state_dict with a clear error naming missing, unexpected and mismatched keys.

    ``fresh``: name fragments of parameters that may be missing from ``sd`` and keep the
    model's own init (training a grown model from a smaller checkpoint, e.g. "action_mlp")."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd and not any(f in k for f in fresh))
    unexpected = sorted(k for k in sd if k not in own)
    shape = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in sd and sd[k].shape != own[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
        if shape:
            parts.append(f"shape mismatch e.g. {shape[:2]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in sd.items()}}, strict=True)


def save_release(path: str, state_dict: dict[str, torch.Tensor], config: dict | None = None):
    """Write a safetensors release atomically, the pipeline config in its metadata."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp"
    meta = {CONFIG_KEY: json.dumps(config)} if config is not None else None
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def config_from_metadata(meta: dict[str, str]) -> dict | None:
    if CONFIG_KEY in meta:
        try:
            return json.loads(meta[CONFIG_KEY])
        except ValueError:
            raise CheckpointError(f"checkpoint metadata '{CONFIG_KEY}' is not valid JSON") from None
    return None


def save_sharded(directory: str, state_dict: dict[str, torch.Tensor], max_shard_bytes: int,
                 prefix: str = "diffusion_pytorch_model") -> str:
    """Write ``prefix-0000i-of-0000n.safetensors`` shards plus ``prefix.safetensors.index.json``."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state_dict):
        t = state_dict[k].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(directory, name))
        weight_map.update({k: name for k in shard})
    index = os.path.join(directory, f"{prefix}.safetensors.index.json")
    with open(index, "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return index


def save_diffusers(directory: str, wan_state_dict: dict[str, torch.Tensor], model_cfg) -> None:
    """Export Wan-layout DiT weights as a diffusers ``WanTransformer3DModel`` directory."""
    from safetensors.torch import save_file
    from .convert import model_to_diffusers_config, wan_to_diffusers
    os.makedirs(directory, exist_ok=True)
    cfg = {"_class_name": "WanTransformer3DModel", **model_to_diffusers_config(model_cfg)}
    cfg["patch_size"] = list(cfg["patch_size"])
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    sd = {k: v.detach().contiguous().cpu() for k, v in wan_to_diffusers(wan_state_dict).items()}
    save_file(sd, os.path.join(directory, "diffusion_pytorch_model.safetensors"))


# ---------------------------------------------------------------------------- one entry point
@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]           # DiT weights, Wan2.1 names
    config: Any                                   # PipelineConfig dict / preset name / PipelineConfig
    layout: str                                   # "wan" | "diffusers"
    family: str | None = None                     # family preset used (None: from metadata/config)
    config_source: str = ""                       # where the config came from
    autoencoder: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


def _json_file(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _model_fields_from_json(cfg: dict) -> dict | None:
    """ModelConfig fields from a Wan (WanModel) or diffusers (WanTransformer3DModel) config.json."""
    from .convert import diffusers_config_to_model, wan_config_to_model
    cls = cfg.get("_class_name", "")
    if cls == "WanTransformer3DModel" or "num_attention_heads" in cfg:
        return diffusers_config_to_model(cfg)
    if cls == "WanModel" or ("dim" in cfg and "num_heads" in cfg):
        return wan_config_to_model(cfg)
    return None


_SHAPE_FIELDS = ("dim", "ffn_dim", "num_layers", "in_channels", "out_channels", "text_dim", "freq_dim",
                 "patch_size", "qk_norm", "cross_attn_norm", "pos_embed", "pos_grid", "action_inject",
                 "frame_cond")


def _with_model(preset: dict, fields: dict | None, shape_fields: dict, notes: list[str]) -> dict:
    """The preset with its model replaced where the checkpoint says otherwise.

    A Wan/diffusers ``config.json`` (``fields``) wins; else, when the tensor shapes differ from
    the preset's model, the shapes are used and the head count keeps the preset's head_dim.
    """
    from ..config import ModelConfig
    from ..config.presets import thaw
    out = thaw(preset)                                   # a plain deep copy (presets are read-only)
    model = dict(out.get("model", {}))
    current = ModelConfig.from_dict(model)
    if fields:
        model.update(fields)
    elif any(tuple(current.patch_size) != tuple(v) if k == "patch_size" else getattr(current, k) != v
             for k, v in shape_fields.items() if k != "num_heads"):
        model.update({k: v for k, v in shape_fields.items() if k != "num_heads"})
        hd = current.head_dim
        model["num_heads"] = model["dim"] // hd if model["dim"] % hd == 0 else shape_fields["num_heads"]
        notes.append(f"model shape read from the tensors; num_heads={model['num_heads']} assumes head_dim "
                     f"{model['dim'] // model['num_heads']} (add a config.json to be exact)")
    out["model"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.items()}
    return out


def load_checkpoint(path: str, config=None, default_family: str = "self-forcing") -> LoadedCheckpoint:
    """DiT weights (Wan2.1 names) of a file or directory and the pipeline config to run them.

    ``config``: a preset/family name, a PipelineConfig dict or a PipelineConfig (an explicit
    choice; the model shape is still taken from the checkpoint when it differs).
    """
    from . import families
    from ..config import PIPELINE_PRESETS, PipelineConfig, to_dict
    from .convert import infer_model_config, to_wan_layout
    raw, meta = read_weights(path)
    sd = unwrap_state_dict(raw)
    sd, layout = to_wan_layout(sd)
    bad = sorted(k for k, v in sd.items() if not (v.is_floating_point()))
    if bad:
        raise CheckpointError(f"{path}: tensor(s) {bad[:3]} are not floating point ({sd[bad[0]].dtype})")
    shape_fields = {k: v for k, v in infer_model_config(sd).items() if k in _SHAPE_FIELDS + ("num_heads",)}
    notes: list[str] = []
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(os.path.join(root, "transformer")):
        root = os.path.join(root, "transformer")
    json_cfg = _json_file(os.path.join(root, "config.json"))
    fields = None
    streamgen_cfg = None
    if json_cfg is not None:
        fields = _model_fields_from_json(json_cfg)
        if fields is None and os.path.isdir(path):
            streamgen_cfg = json_cfg                           # a streamgen release directory
    ae = None
    ae_path = os.path.join(root, "autoencoder.safetensors")
    if os.path.exists(ae_path):     # a release folder, or its model file: the sibling autoencoder belongs to it
        ae, _ = read_weights(ae_path)

    meta_cfg = config_from_metadata(meta)
    family = None
    if config is not None:
        if isinstance(config, PipelineConfig):
            config = to_dict(config)
        if isinstance(config, str):
            if config not in PIPELINE_PRESETS:
                raise ConfigError(f"unknown config {config!r}; families: {', '.join(families.FAMILY_PRESETS)}")
            family = config
            config = PIPELINE_PRESETS[config]
        cfg, source = _with_model(config, fields, shape_fields, notes), f"config={family or 'dict'}"
    elif meta_cfg is not None:
        cfg, source = meta_cfg, "release metadata"
    elif streamgen_cfg is not None:
        cfg, source = streamgen_cfg, "config.json"
    else:
        family = families.guess_family(path)
        source = f"family {family!r} guessed from the file name"
        if family is None:
            family = default_family
            source = f"no config found: {default_family!r} defaults"
            warnings.warn(f"{path}: no config in the checkpoint and no family in its name; running it with "
                          f"the {default_family!r} preset (pass config=<family> / --config to choose)",
                          stacklevel=2)
        cfg = _with_model(PIPELINE_PRESETS[family], fields, shape_fields, notes)
    return LoadedCheckpoint(sd, cfg, layout, family, source, ae, notes)
