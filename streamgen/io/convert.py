"""Wan2.1 <-> diffusers ``WanTransformer3DModel`` state-dict conversion, and layout detection.

Both layouts hold the same tensors with the same shapes; only names differ:

    Wan2.1 (streamgen's own)              diffusers
    patch_embedding.*                     patch_embedding.*
    text_embedding.{0,2}.*                condition_embedder.text_embedder.linear_{1,2}.*
    time_embedding.{0,2}.*                condition_embedder.time_embedder.linear_{1,2}.*
    time_projection.1.*                   condition_embedder.time_proj.*
    blocks.N.self_attn.{q,k,v,o}.*        blocks.N.attn1.{to_q,to_k,to_v,to_out.0}.*
    blocks.N.self_attn.norm_{q,k}.*       blocks.N.attn1.norm_{q,k}.*
    blocks.N.cross_attn.*                 blocks.N.attn2.*           (same pattern)
    blocks.N.cross_attn.{k,v}_img.*       blocks.N.attn2.add_{k,v}_proj.*   (I2V only)
    blocks.N.cross_attn.norm_k_img.*      blocks.N.attn2.norm_added_k.*     (I2V only)
    blocks.N.norm3.*  (cross-attn norm)   blocks.N.norm2.*
    blocks.N.ffn.{0,2}.*                  blocks.N.ffn.net.0.proj.*, blocks.N.ffn.net.2.*
    blocks.N.modulation                   blocks.N.scale_shift_table
    head.head.*                           proj_out.*
    head.modulation                       scale_shift_table
    img_emb.proj.{0,1,3,4}.*              condition_embedder.image_embedder.{norm1,ff.net.0.proj,ff.net.2,norm2}.*

Wan's parameter-free norms (norm1, norm2, head.norm) have no tensors. streamgen-only keys
(``action_embedding.*``) have no diffusers counterpart and pass through unchanged.
Verified against diffusers 0.42's transformer_wan.py (tests/test_parity_diffusers.py).
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

# Literal name pairs inside ``blocks.N.`` (Wan prefix, diffusers prefix); exact names below.
_BLOCK_RULES: list[tuple[str, str]] = [
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."), ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."), ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."), ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."), ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."), ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."),
]
_BLOCK_EXACT = {"modulation": "scale_shift_table"}
_TOP_RULES: list[tuple[str, str]] = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
]
_TOP_EXACT = {"head.modulation": "scale_shift_table"}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rename(key: str, block_rules, block_exact, top_rules, top_exact) -> str:
    m = _BLOCK.match(key)
    if m:
        idx, rest = m.groups()
        if rest in block_exact:
            return f"blocks.{idx}.{block_exact[rest]}"
        for a, b in block_rules:
            if rest.startswith(a):
                return f"blocks.{idx}.{b}{rest[len(a):]}"
        return key
    if key in top_exact:
        return top_exact[key]
    for a, b in top_rules:
        if key.startswith(a):
            return b + key[len(a):]
    return key


def wan_key_to_diffusers(key: str) -> str:
    return _rename(key, _BLOCK_RULES, _BLOCK_EXACT, _TOP_RULES, _TOP_EXACT)


def diffusers_key_to_wan(key: str) -> str:
    flip = lambda pairs: [(b, a) for a, b in pairs]  # noqa: E731
    return _rename(key, flip(_BLOCK_RULES), {v: k for k, v in _BLOCK_EXACT.items()},
                   flip(_TOP_RULES), {v: k for k, v in _TOP_EXACT.items()})


def _convert(sd: dict[str, torch.Tensor], fn, target: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        nk = fn(k)
        if nk in out:
            raise CheckpointError(f"converting to {target} layout: two tensors map to {nk!r}")
        out[nk] = v
    return out


def wan_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan2.1 names -> diffusers ``WanTransformer3DModel`` names (same tensors)."""
    return _convert(sd, wan_key_to_diffusers, "diffusers")


def diffusers_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``WanTransformer3DModel`` names -> Wan2.1 names (same tensors)."""
    # diffusers may store fused projections (to_qkv / to_kv) after fuse_projections().
    sd = dict(sd)
    for k in [k for k in sd if ".to_qkv." in k or ".to_kv." in k]:
        t = sd.pop(k)
        names = ("to_q", "to_k", "to_v") if ".to_qkv." in k else ("to_k", "to_v")
        for n, part in zip(names, t.chunk(len(names), dim=0)):
            sd[k.replace(".to_qkv." if len(names) == 3 else ".to_kv.", f".{n}.")] = part
    return _convert(sd, diffusers_key_to_wan, "Wan2.1")


WAN_MARKERS = ("head.head.weight", "time_projection.1.weight", "blocks.0.self_attn.q.weight")
DIFFUSERS_MARKERS = ("proj_out.weight", "condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight")


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """"wan" | "diffusers" for a DiT state dict (prefixes already stripped)."""
    wan = sum(k in sd for k in WAN_MARKERS)
    dif = sum(k in sd for k in DIFFUSERS_MARKERS)
    if wan and not dif:
        return "wan"
    if dif and not wan:
        return "diffusers"
    sample = sorted(sd)[:4]
    if wan and dif:
        raise CheckpointError(f"the checkpoint mixes Wan2.1 and diffusers parameter names (e.g. {sample})")
    raise CheckpointError("not a Wan2.1 DiT checkpoint: none of "
                          f"{', '.join(WAN_MARKERS[:2])} (Wan2.1) or {', '.join(DIFFUSERS_MARKERS[:2])} "
                          f"(diffusers) found; first keys: {sample}")


def to_wan_layout(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in Wan2.1 names, the layout it came in)."""
    layout = detect_layout(sd)
    return (sd if layout == "wan" else diffusers_to_wan(sd)), layout


# ---------------------------------------------------------------------------- configs
def diffusers_config_to_model(cfg: dict) -> dict:
    """diffusers WanTransformer3DModel config.json -> ModelConfig fields."""
    try:
        heads, hd = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        out = dict(dim=heads * hd, num_heads=heads, ffn_dim=int(cfg["ffn_dim"]), num_layers=int(cfg["num_layers"]),
                   in_channels=int(cfg["in_channels"]), out_channels=int(cfg.get("out_channels") or cfg["in_channels"]),
                   text_dim=int(cfg["text_dim"]), freq_dim=int(cfg["freq_dim"]),
                   patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), eps=float(cfg.get("eps", 1e-6)),
                   cross_attn_norm=bool(cfg.get("cross_attn_norm", True)), qk_norm=bool(cfg.get("qk_norm")),
                   rope_max_pos=int(cfg.get("rope_max_seq_len", 1024)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"diffusers config.json is missing or has a bad field: {e}") from None
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
        raise CheckpointError("image-conditioned (I2V) Wan transformers are not supported by streamgen")
    return out


def model_to_diffusers_config(m) -> dict:
    """ModelConfig -> diffusers WanTransformer3DModel constructor kwargs."""
    return dict(patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads, attention_head_dim=m.head_dim,
                in_channels=m.in_channels, out_channels=m.out_channels, text_dim=m.text_dim, freq_dim=m.freq_dim,
                ffn_dim=m.ffn_dim, num_layers=m.num_layers, cross_attn_norm=m.cross_attn_norm,
                qk_norm="rms_norm_across_heads" if m.qk_norm else None, eps=m.eps, rope_max_seq_len=m.rope_max_pos)


def wan_config_to_model(cfg: dict) -> dict:
    """Wan2.1's own config.json (WanModel: dim, ffn_dim, in_dim, ...) -> ModelConfig fields."""
    try:
        out = dict(dim=int(cfg["dim"]), ffn_dim=int(cfg["ffn_dim"]), num_heads=int(cfg["num_heads"]),
                   num_layers=int(cfg["num_layers"]), in_channels=int(cfg.get("in_dim", 16)),
                   out_channels=int(cfg.get("out_dim", 16)), freq_dim=int(cfg.get("freq_dim", 256)),
                   text_len=int(cfg.get("text_len", 512)), eps=float(cfg.get("eps", 1e-6)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Wan config.json is missing or has a bad field: {e}") from None
    if cfg.get("model_type", "t2v") != "t2v":
        raise CheckpointError(f"Wan model_type {cfg.get('model_type')!r} is not supported (only t2v)")
    return out


def infer_model_config(sd: dict[str, torch.Tensor], head_dim: int = 128) -> dict:
    """ModelConfig fields read off Wan-layout tensor shapes (heads assume Wan's head_dim 128)."""
    def shape(k):
        if k not in sd:
            raise CheckpointError(f"not a Wan2.1 DiT checkpoint: missing tensor {k!r}")
        return tuple(sd[k].shape)
    pe = shape("patch_embedding.weight")                        # [dim, in_ch, pt, ph, pw]
    dim = pe[0]
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    if not layers:
        raise CheckpointError("not a Wan2.1 DiT checkpoint: no blocks.N.* tensors")
    if layers != set(range(max(layers) + 1)):
        raise CheckpointError(f"blocks are not numbered 0..{max(layers)}: missing "
                              f"{sorted(set(range(max(layers) + 1)) - layers)[:5]}")
    patch = pe[2:]
    out_ch = shape("head.head.weight")[0] // (patch[0] * patch[1] * patch[2])
    cfg = dict(dim=dim, ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_layers=len(layers),
               in_channels=pe[1], out_channels=out_ch, text_dim=shape("text_embedding.0.weight")[1],
               freq_dim=shape("time_embedding.0.weight")[1], patch_size=tuple(patch),
               qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd)
    cfg["num_heads"] = max(1, dim // head_dim) if dim % head_dim == 0 else 1
    if "pos_embedding_h" in sd:                                 # streamgen's small models
        cfg.update(pos_embed="learned", pos_grid=shape("pos_embedding_h")[0])
    if "action_features.0.weight" in sd:
        cfg["action_inject"] = "time+blocks"
    if "frame_cond_embedding.weight" in sd:
        cfg["frame_cond"] = "last"
    return cfg
