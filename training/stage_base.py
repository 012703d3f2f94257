"""The training stage base: the ``Stage`` protocol every trainer implements, and the helpers
they share (loading a DiT or tiny-ae, AdamW with lr multipliers, EMA, checkpoint state).

Stage protocol: ``Stage(cfg, dist)``; ``state()`` / ``load(state)`` for checkpoints;
``step(i) -> metrics``; ``sample(i) -> uint8 [T, H, W, 3] | None``; ``export(dir)`` writes
``release.safetensors`` (Wan key names, pipeline config in metadata; the autoencoder
stage writes the tiny-ae weights).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint

from ..codecs.autoencoder import TinyAutoencoder
from ..config import to_dict
from ..errors import ConfigError
from ..io.checkpoint import check_and_load, read_weights, unwrap_state_dict
from ..models.model import WanDiT
from . import losses as L
from .config import RunConfig
from .data import step_seed
from .distributed import Dist, full_state_dict, full_tensor

HELD_OUT = 16   # last clips of the data set: samples, never trained on


# ------------------------------------------------------------------ helpers
def load_dit(pcfg, path: str | None, dist: Dist, reset: tuple[str, ...] = ()) -> WanDiT:
    """A DiT of ``pcfg.model`` with the weights of ``path``; parameters whose names start with a
    ``reset`` prefix keep their fresh init (e.g. a new latent's patch embedding and head)."""
    torch.manual_seed(0)
    m = WanDiT(pcfg.model)
    if path:
        sd = unwrap_state_dict(read_weights(path)[0])
        sd = {k: v for k, v in sd.items() if not any(k.startswith(r) for r in reset)}
        # a "time+blocks" model may start from a "time" checkpoint: its action MLPs start at zero
        # (and a frame_cond model from a plain one: its frame embedding starts at zero)
        check_and_load(m, sd, source=path, fresh=("action_mlp", "action_features", "frame_cond_embedding")
                       + tuple(reset))
    return m.to(dist.device)


def load_autoencoder(path: str, latent_channels: int, device, stride: int = 8) -> TinyAutoencoder:
    sd = read_weights(path)[0] if path else None
    ae = TinyAutoencoder.from_state(sd, latent_channels, stride=stride)
    if ae.spatial_stride != stride:
        raise ConfigError(f"{path}: a tiny-ae of spatial stride {ae.spatial_stride}, the pipeline expects {stride}")
    return ae.to(device).eval()


def adamw(params, oc) -> torch.optim.Optimizer:
    """AdamW over a module's trainable parameters (or a list of them); ``oc.lr_mult`` puts the
    parameters whose names start with a prefix in their own group with that lr multiplier."""
    named = ([(n, p) for n, p in params.named_parameters() if p.requires_grad]
             if isinstance(params, torch.nn.Module) else [("", p) for p in params])
    groups: dict[float, list] = {}
    for n, p in named:
        mult = next((float(v) for k, v in oc.lr_mult.items() if n.startswith(k)), 1.0)
        groups.setdefault(mult, []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr_mult": mult} for mult, ps in groups.items()],
                             lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def frozen(m: torch.nn.Module) -> torch.nn.Module:
    m.eval().requires_grad_(False)
    return m


def enable_grad_checkpointing(model: WanDiT):
    for blk in model.blocks:
        fwd = blk.forward
        blk.forward = functools.partial(torch.utils.checkpoint.checkpoint, fwd, use_reentrant=False)


class Stage:
    def __init__(self, cfg: RunConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.pcfg = cfg.pipeline_config()
        self.device = dist.device
        on_gpu = self.device.type == "cuda"
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
        self.ckpt_act = cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto" and on_gpu)
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.mods: dict[str, torch.nn.Module] = {}
        self.ema: dict[str, torch.Tensor] | None = None

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def gen(self, step: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(step_seed(self.cfg.seed, step, self.dist.rank, salt))

    def randn(self, shape, g):
        return torch.randn(shape, generator=g).to(self.device)

    def update(self, name: str, loss: torch.Tensor, step: int, oc) -> float:
        """backward, all-reduce, clip, warmup lr, AdamW step. Returns the grad norm."""
        m, opt = self.mods[name], self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.sync_grads(m)
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), oc.grad_clip)
        lr = L.lr_at(step, self.cfg.steps, oc.lr, oc.warmup, oc.schedule, oc.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        opt.step()
        return float(gn)

    def init_ema(self, model):
        self.ema = {k: p.detach().clone() for k, p in model.named_parameters()}

    def ema_step(self, model, step: int):
        d = L.ema_decay_at(step, self.cfg.ema_decay, self.cfg.ema_start)
        L.ema_update(self.ema, dict(model.named_parameters()), d)

    def ema_state_dict(self, model) -> dict:
        sd = full_state_dict(model)
        for k, v in self.ema.items():
            sd[k] = full_tensor(v)          # FSDP2: EMA shards are DTensors, gathered like the model
        return sd

    def state(self) -> dict:
        s = {f"model.{n}": full_state_dict(m) for n, m in self.mods.items()}
        s.update({f"optim.{n}": o.state_dict() for n, o in self.opts.items()})
        if self.ema is not None:
            s["ema"] = {k: v.detach().cpu() for k, v in self.ema.items()}
        return s

    def load(self, s: dict):
        for n, m in self.mods.items():
            m.load_state_dict(s[f"model.{n}"])
        for n, o in self.opts.items():
            o.load_state_dict(s[f"optim.{n}"])
        if self.ema is not None and "ema" in s:
            for k, v in s["ema"].items():
                self.ema[k].copy_(v)

    def sample(self, step: int):
        return None

    def release_config(self) -> dict:
        return to_dict(self.pcfg)


def _side_by_side(a: torch.Tensor, b: torch.Tensor):
    """two [T, 3, H, W] videos in [-1, 1] -> uint8 [T, H, 2W, 3]."""
    x = torch.cat([a, b], dim=-1).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
