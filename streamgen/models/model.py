"""Wan2.1-layout diffusion transformer, bidirectional or block-causal with the same weights.

Parameter names and shapes are exactly Wan2.1's, so Wan and Self-Forcing-family state dicts
load without renaming. Additions: per-frame timesteps (per-frame adaLN), an optional
action embedding (``action_embedding.{0,2}``) added to the per-frame time embedding, and an
optional previous-frame input (``frame_cond_embedding``, ``ModelConfig.frame_cond``).

Shapes: video latents x [B, F, C, H, W] (frame-major, as Self-Forcing's wrapper), timesteps
t [B, F] in [0, 1000], text context [B, text_len, text_dim], actions [B, F, action_dim].
The model does no I/O.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, attention_backend, stream_attention, stream_backend
from ..config import ModelConfig
from ..errors import ConfigError
from .masks import FrameMask, frame_mask
from .rope import RopeTables, apply_rope


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding [N, dim] (cos | sin), computed in float64."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def previous_chunk_last(x0: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """Each frame's conditioning latent for ``frame_cond="last"`` models: the last frame of the
    previous chunk, zeros in the first chunk. x0 [B, F, C, H, W] clean latents -> same shape."""
    B, Fr = x0.shape[:2]
    out = torch.zeros_like(x0)
    for s in range(chunk_frames, Fr, chunk_frames):
        out[:, s:s + chunk_frames] = x0[:, s - 1:s]
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (Wan's WanLayerNorm)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.dim
        self.layer, self.heads, self.head_dim = layer, cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()

    def _norm_rope(self, norm, x_lin, ctx: "ForwardContext", rotate: bool):
        """norm(x_lin) as heads [B, L, H, D], rotated by the queries' RoPE if ``rotate``; with
        backend "triton" one fused kernel when it can (inference), else PyTorch."""
        if rotate and ctx.backend == "triton" and isinstance(norm, RMSNorm):
            from .kernels_bridge import fused_rmsnorm_rope
            out = fused_rmsnorm_rope(x_lin, norm.weight, *ctx.q_rope, self.heads, norm.eps)
            if out is not None:
                return out
        y = norm(x_lin).view(*x_lin.shape[:2], self.heads, self.head_dim)
        return apply_rope(y, *ctx.q_rope) if rotate else y

    def forward(self, x, ctx: "ForwardContext"):
        B, L, _ = x.shape
        cache = ctx.cache
        q = self._norm_rope(self.norm_q, self.q(x), ctx, rotate=True)                    # [B, L, H, D]
        rotate_k = cache is None or cache.cfg.rope == "absolute"    # relative caches rotate at attention
        k = self._norm_rope(self.norm_k, self.k(x), ctx, rotate=rotate_k)
        v = self.v(x).view(B, L, self.heads, self.head_dim)
        if cache is None:
            out = attention(q, k, v, mask=ctx.mask, backend=ctx.backend)
        else:
            k_all, v_all = cache.write(self.layer, k, v)                     # [B, S_tok, H, D]
            out = stream_attention(q, k_all, v_all, cache.key_valid, backend=ctx.backend,
                                   k_rope=ctx.k_rope)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()

    def kv(self, context):
        B, Lc, _ = context.shape
        k = self.norm_k(self.k(context)).view(B, Lc, self.heads, self.head_dim)
        v = self.v(context).view(B, Lc, self.heads, self.head_dim)
        return k, v

    def forward(self, x, kv, backend):
        B, L, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, L, self.heads, self.head_dim)
        out = attention(q, kv[0], kv[1], backend=backend)
        return self.o(out.flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg, layer)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)
        if cfg.actions.enabled and cfg.action_inject == "time+blocks":
            self.action_norm = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
            self.action_mlp = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
            nn.init.zeros_(self.action_mlp[2].weight)        # starts as the "time" model
            nn.init.zeros_(self.action_mlp[2].bias)

    def forward(self, x, e, ctx: "ForwardContext", cross_kv=None, context=None, act=None):
        # x [B, L, dim]; e [B, F, 6, dim]; cross_kv (k, v) [B, Lc, H, D] each, or computed here
        # from context [B, Lc, dim] (inside this block's forward: what FSDP2 unshards);
        # act [B, F, dim] per-frame action features ("time+blocks" models) or None
        if cross_kv is None:
            cross_kv = self.cross_attn.kv(context)
        B, L, d = x.shape
        Fr = e.shape[1]
        m = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)               # 6 x [B, F, 1, dim]
        frames = lambda t: t.view(B, Fr, L // Fr, d)                        # noqa: E731
        if act is not None and hasattr(self, "action_mlp"):
            a = act[:, :, None, :].expand(B, Fr, L // Fr, d).reshape(B, L, d)
            x = x + self.action_mlp(torch.cat([self.action_norm(x), a.to(x.dtype)], dim=-1))

        def modulate(norm, x, shift, scale):         # LN(x) * (1 + scale) + shift per frame [B, L, d]
            if ctx.backend == "triton":
                from .kernels_bridge import fused_layernorm_modulate
                y = fused_layernorm_modulate(x, shift, scale, norm.eps)
                if y is not None:
                    return y
            return (frames(norm(x)) * (1 + scale) + shift).view(B, L, d)
        y = self.self_attn(modulate(self.norm1, x, m[0], m[1]), ctx)
        x = x + (frames(y) * m[2]).view(B, L, d)
        x = x + self.cross_attn(self.norm3(x), cross_kv, ctx.backend)
        y = self.ffn(modulate(self.norm2, x, m[3], m[4]))
        return x + (frames(y) * m[5]).view(B, L, d)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        # x [B, L, dim]; e [B, F, dim]
        B, L, d = x.shape
        Fr = e.shape[1]
        m = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # 2 x [B, F, 1, dim]
        return self.head((self.norm(x).view(B, Fr, L // Fr, d) * (1 + m[1]) + m[0]).view(B, L, d))


class ForwardContext:
    """Per-call attention state shared by all blocks (mask or cache, RoPE tables, backend)."""

    __slots__ = ("q_rope", "k_rope", "mask", "cache", "backend")

    def __init__(self, q_rope, k_rope=None, mask=None, cache=None, backend="sdpa"):
        self.q_rope, self.k_rope, self.mask, self.cache, self.backend = q_rope, k_rope, mask, cache, backend


class WanDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=p, stride=p)
        if cfg.frame_cond != "none":         # the previous chunk's last frame, same patches
            self.frame_cond_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=p, stride=p)
            nn.init.zeros_(self.frame_cond_embedding.weight)      # starts as the plain model
            nn.init.zeros_(self.frame_cond_embedding.bias)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if cfg.actions.enabled:
            self.action_embedding = nn.Sequential(nn.Linear(cfg.actions.dim, d), nn.SiLU(), nn.Linear(d, d))
            nn.init.zeros_(self.action_embedding[2].weight)
            nn.init.zeros_(self.action_embedding[2].bias)
            if cfg.action_inject == "time+blocks":             # features for the blocks' action MLPs
                self.action_features = nn.Sequential(nn.Linear(cfg.actions.dim, d), nn.SiLU(), nn.Linear(d, d))
        if cfg.pos_embed == "learned":
            self.pos_embedding_h = nn.Parameter(torch.zeros(cfg.pos_grid, d))   # [rows, dim]
            self.pos_embedding_w = nn.Parameter(torch.zeros(cfg.pos_grid, d))   # [cols, dim]
            nn.init.normal_(self.pos_embedding_h, std=0.02)
            nn.init.normal_(self.pos_embedding_w, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RopeTables(cfg)
        self.attn_backend = "sdpa"

    def attention_backends(self, grad: bool = False) -> dict[str, str]:
        """The backend each attention call path runs with ``attn_backend`` on this model's
        device and dtype (``grad``: while autograd records), decided by the same functions the
        calls dispatch with: "self_bidirectional" (full forward, no mask), "self_block_causal"
        (full forward, block-causal :class:`FrameMask`), "self_stream" (through a cache) and
        "cross" (text cross-attention)."""
        p = next(self.parameters())
        H, D = self.cfg.num_heads, self.cfg.head_dim
        with torch.set_grad_enabled(grad):
            q, k, v = (torch.zeros(1, 2, H, D, device=p.device, dtype=p.dtype, requires_grad=grad)
                       for _ in range(3))                                    # [1, 2, H, D] each
            valid = torch.ones(1, 2, dtype=torch.bool, device=p.device)      # [1, 2]
            b = self.attn_backend
            return {"self_bidirectional": attention_backend(q, k, v, None, b),
                    "self_block_causal": attention_backend(q, k, v, FrameMask(2, 1), b),
                    "self_stream": stream_backend(q, k, v, valid, b),
                    "cross": attention_backend(q, k[:, :1], v[:, :1], None, b)}

    # ------------------------------------------------------------------ pieces
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, text_len, text_dim] -> context [B, text_len, dim]."""
        return self.text_embedding(text)

    def cross_kv(self, text: torch.Tensor):
        """Per-layer cross-attention K/V of a prompt (cache it per session)."""
        context = self.embed_text(text)
        return [blk.cross_attn.kv(context) for blk in self.blocks]

    def _time(self, t, action):
        B, Fr = t.shape
        sin = sinusoidal_embedding(self.cfg.freq_dim, t.flatten())
        e = self.time_embedding(sin.to(self.time_embedding[0].weight.dtype))           # [B*F, dim]
        if action is not None and self.cfg.actions.enabled:
            e = e + self.action_embedding(action.reshape(B * Fr, -1).to(e.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))          # [B*F, 6, dim]
        return e.view(B, Fr, -1), e0.view(B, Fr, 6, -1)

    def _patchify(self, x, frame_cond=None):
        # x [B, F, C, H, W] (and frame_cond, same shape) -> tokens [B, F*h*w, dim], grid (F, h, w)
        y = self.patch_embedding(x.transpose(1, 2))                          # [B, dim, F', h, w]
        if frame_cond is not None:
            y = y + self.frame_cond_embedding(frame_cond.to(x.dtype).transpose(1, 2))
        grid = y.shape[2:]
        if self.cfg.pos_embed == "learned":
            h, w = grid[1], grid[2]
            if max(h, w) > self.cfg.pos_grid:
                raise ConfigError(f"a {h}x{w} patch grid exceeds pos_grid {self.cfg.pos_grid}")
            pos = self.pos_embedding_h[:h, None, :] + self.pos_embedding_w[None, :w, :]   # [h, w, dim]
            y = y + pos.permute(2, 0, 1)[None, :, None].to(y.dtype)                     # [1, dim, 1, h, w]
        return y.flatten(2).transpose(1, 2), grid

    def _unpatchify(self, y, grid):
        B = y.shape[0]
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_channels
        y = y.view(B, f, h, w, pt, ph, pw, c)
        y = torch.einsum("bfhwpqrc->bfpchqwr", y)
        return y.reshape(B, f * pt, c, h * ph, w * pw)                      # [B, F, C, H, W]

    # ------------------------------------------------------------------ forward
    def forward(self, x, t, text=None, *, action=None, cache=None, cross_kv=None,
                attn_mode: str = "bidirectional", chunk_frames: int = 1, sink_frames: int = 0,
                window_frames: int = -1, frame_offset: int = 0, frame_cond=None):
        """Flow prediction v [B, F, C, H, W].

        Full forward (cache=None): ``attn_mode`` "bidirectional" or "block_causal" (chunks of
        ``chunk_frames``; ``window_frames``/``sink_frames`` restrict it like a rolling cache).
        Streaming (cache given): x is the chunk the cache was prepared for with
        ``cache.begin_chunk``; its K/V are written into the cache in place.
        Text: pass ``text`` [B, text_len, text_dim] or precomputed ``cross_kv``
        (default: ``cache.cross_kv``).
        ``frame_cond`` ("last" / "residual" models): each frame's conditioning latent [B, F, C, H, W]
        (:func:`previous_chunk_last` of the clean latents); streaming reads ``cache.last_frame``.
        """
        B, Fr = x.shape[:2]
        if t.dim() == 1:
            t = t[:, None].expand(B, Fr)
        context = None
        if cross_kv is None:
            if cache is not None and text is None:
                cross_kv = cache.cross_kv
            else:                            # each block projects its own K/V (= self.cross_kv(text))
                context = self.embed_text(text)                               # [B, Lc, dim]
        if self.cfg.frame_cond == "none":
            frame_cond = None
        elif frame_cond is None:
            if cache is None:
                raise ConfigError(f"this model (frame_cond={self.cfg.frame_cond!r}) needs frame_cond= [B, F, C, H, W] in a "
                                  "full forward: previous_chunk_last(clean latents, chunk_frames)")
            frame_cond = cache.last_frame[:, None].expand(B, Fr, *cache.last_frame.shape[1:])
        elif frame_cond.shape != x.shape:
            raise ConfigError(f"frame_cond must have the latents' shape {list(x.shape)}, got {list(frame_cond.shape)}")
        tokens, grid = self._patchify(x, frame_cond)
        f, h, w = grid
        e, e0 = self._time(t, action)
        if self.cfg.patch_size[0] != 1:
            raise NotImplementedError("temporal patching is not supported by the streaming engine")
        if cache is None:
            pos = torch.arange(frame_offset, frame_offset + f, device=x.device).expand(B, f)
            ctx = ForwardContext(self.rope.grid(pos, h, w), backend=self.attn_backend,
                                 mask=frame_mask(f, h * w, mode=attn_mode, chunk_frames=chunk_frames,
                                                 sink_frames=sink_frames, window_frames=window_frames,
                                                 device=x.device))
        else:
            k_rope = None
            if cache.cfg.rope == "relative":
                k_rope = self.rope.grid(cache.k_pos, h, w)
            ctx = ForwardContext(self.rope.grid(cache.q_pos, h, w), k_rope=k_rope, cache=cache,
                                 backend=self.attn_backend)
        act = None
        if action is not None and hasattr(self, "action_features"):
            act = self.action_features(action.to(self.action_features[0].weight.dtype))   # [B, F, dim]
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, e0, ctx, None if cross_kv is None else cross_kv[i], context, act)
        v = self._unpatchify(self.head(tokens, e), grid)                   # [B, F, C, H, W]
        if self.cfg.frame_cond == "residual":                # the flow of the change since the frame
            v = v - frame_cond.to(v.dtype)
        return v
