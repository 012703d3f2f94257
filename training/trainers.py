"""Training stages. They only orchestrate: every formula lives in ``losses.py``, the
self-forcing rollout in ``rollout.py``.

Stage protocol: ``Stage(cfg, dist)``; ``state()`` / ``load(state)`` for checkpoints;
``step(i) -> metrics``; ``sample(i) -> uint8 [T, H, W, 3] | None``; ``export(dir)`` writes
``release.safetensors`` (Wan key names, pipeline config in metadata; the autoencoder
stage writes the tiny-ae weights).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import torch.utils.checkpoint

from ..codecs.autoencoder import TinyAutoencoder
from ..io.checkpoint import check_and_load, read_weights, save_release, unwrap_state_dict
from ..config import to_dict
from ..models.model import WanDiT
from ..engine.sampling import FewStepSampler
from ..engine.chunk_step import rollout as inference_rollout
from ..errors import ConfigError
from . import losses as L
from .config import RunConfig
from .data import batch_indices, load_frames, load_latents, step_seed, to_video
from .distributed import Dist, full_state_dict, full_tensor
from .rollout import new_cache, rollout

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


# ------------------------------------------------------------------ autoencoder
class AutoencoderStage(Stage):
    """The tiny-ae: L1 + MSE (+ ``ae_edge_loss`` x image-gradient L1) on latents with a little
    noise. ``ae_train: decoder`` fine-tunes only the decoder of the ``init`` release."""

    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        torch.manual_seed(cfg.seed)
        self.data = load_frames(cfg.data)
        self.n = self.data["frames"].shape[0] - HELD_OUT
        if cfg.init:
            sd, _ = read_weights(cfg.init)
            ae = TinyAutoencoder.from_state(sd, self.pcfg.model.in_channels)
        else:
            ae = TinyAutoencoder(self.pcfg.model.in_channels, cfg.ae_width, stride=self.pcfg.spatial_stride)
        if ae.spatial_stride != self.pcfg.spatial_stride:
            raise ConfigError(f"the tiny-ae has spatial stride {ae.spatial_stride}, the pipeline {self.pcfg.spatial_stride}")
        if cfg.ae_train == "decoder":
            ae.encoder.requires_grad_(False)
        self.mods["ae"] = dist.prepare(ae)
        self.opts["ae"] = adamw([p for p in self.mods["ae"].parameters() if p.requires_grad], cfg.optim)

    def step(self, step):
        ae, g, c = self.mods["ae"], self.gen(step), self.cfg
        idx = batch_indices(self.n, c.batch_size, step, c.seed, self.dist.rank)
        video = to_video(self.data["frames"][idx]).to(self.device)                 # [B, T, 3, H, W]
        with self.autocast():
            with torch.set_grad_enabled(c.ae_train == "all"):          # a frozen encoder keeps no graph
                z = ae.encode_raw(video)
            zn = z + c.ae_latent_noise * z.detach().std() * self.randn(z.shape, g)
            rec = ae.decode_raw(zn)
            l1 = (rec.float() - video).abs().mean()
            mse = (rec.float() - video).pow(2).mean()
            edge = L.edge_l1(rec, video)
            loss = l1 + mse + c.ae_edge_loss * edge + 1e-4 * z.float().pow(2).mean()
        gn = self.update("ae", loss, step, c.optim)
        return {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "edge": edge.item(), "grad_norm": gn}

    @torch.no_grad()
    def finalize(self):
        if self.cfg.ae_train == "decoder":          # the encoder and its normalisation are the init's
            return
        ae = self.mods["ae"]
        ae.set_latent_stats(to_video(self.data["frames"][: min(128, self.n)]).to(self.device))

    @torch.no_grad()
    def sample(self, step):
        ae = self.mods["ae"].eval()
        v = to_video(self.data["frames"][-1:]).to(self.device)
        z = ae.encode(v)
        st, outs = ae.init_state(1), []
        for s in range(0, z.shape[1], 3):
            f, st = ae.decode_chunk(z[:, s:s + 3], st)
            outs.append(f)
        ae.train()
        rec = torch.cat(outs, 1)[0]
        return _side_by_side(v[0], rec)

    def export(self, out_dir):
        self.finalize()
        save_release(os.path.join(out_dir, "release.safetensors"), full_state_dict(self.mods["ae"]),
                     {"kind": "tiny-ae", "latent_channels": self.pcfg.model.in_channels})


def _side_by_side(a: torch.Tensor, b: torch.Tensor):
    """two [T, 3, H, W] videos in [-1, 1] -> uint8 [T, H, 2W, 3]."""
    x = torch.cat([a, b], dim=-1).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------ DiT stages (latent data)
class LatentStage(Stage):
    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        self.ae = load_autoencoder(cfg.autoencoder, self.pcfg.model.in_channels, self.device, self.pcfg.spatial_stride)
        self.data = load_latents(cfg.data, self.pcfg, self.ae, cfg.autoencoder)
        self.n = self.data["latents"].shape[0] - HELD_OUT
        self.sampler = FewStepSampler(self.pcfg.sampler)
        self.k = self.pcfg.sampler.chunk_frames

    def batch(self, step, held_out: bool = False):
        if held_out:
            idx = torch.arange(self.n, self.n + min(self.cfg.batch_size, HELD_OUT))
        else:
            idx = batch_indices(self.n, self.cfg.batch_size, step, self.cfg.seed, self.dist.rank)
        d = self.data
        x0 = d["latents"][idx].to(self.device)
        act = d["actions"][idx].to(self.device) if self.pcfg.model.actions.enabled else None
        return x0, d["text"][idx].to(self.device), act

    def frame_cond(self, x0, g=None, noise: bool = False) -> dict:
        """The ``frame_cond=`` argument of full forwards for frame_cond models ({} otherwise):
        each chunk sees the previous chunk's last frame of x0 (noise-augmented in training)."""
        if self.pcfg.model.frame_cond == "none":
            return {}
        amount = self.cfg.frame_cond_noise if noise else 0.0
        eps = self.randn(x0.shape, g) if amount > 0 else None
        return {"frame_cond": L.frame_cond_input(x0, self.k, amount, eps, g).to(x0.dtype)}

    def uncond(self, text, act):
        """What "uncond" drops for guidance: text (and actions)."""
        a = act if (act is None or self.cfg.guidance_on == "text") else torch.zeros_like(act)
        return torch.zeros_like(text), a

    def teacher_x0(self, teacher, x_t, t, text, act, guidance, **attn):
        """Teacher x0 with CFG: cond + g (cond - uncond). ``attn``: the teacher's mask arguments."""
        with self.autocast():
            cond = L.x0_from_flow(x_t, teacher(x_t, t, text, action=act, **attn).float(), t)
            if guidance == 0:
                return cond
            ut, ua = self.uncond(text, act)
            unc = L.x0_from_flow(x_t, teacher(x_t, t, ut, action=ua, **attn).float(), t)
        return L.cfg_combine(cond, unc, guidance)

    def score_kw(self):
        """Mask arguments of the students' real score and DMD critic (``teacher_attn``)."""
        return self.mask_kw() if self.cfg.teacher_attn == "block_causal" else {}

    def mask_kw(self):
        c = self.pcfg.cache
        return dict(attn_mode="block_causal", chunk_frames=self.k, sink_frames=c.sink_frames,
                    window_frames=c.window_frames)

    @torch.no_grad()
    def teacher_sample(self, teacher, noise, text, act, steps: int, guidance: float, **fc):
        """Many-step Euler sampling of the bidirectional teacher (with CFG); ``fc``: its
        ``frame_cond=`` (frame_cond models)."""
        ts = L.ode_timesteps(steps, self.cfg.shift)
        x = noise
        B, Fr = x.shape[:2]
        for a, b in zip(ts[:-1], ts[1:]):
            t = torch.full((B, Fr), a, device=x.device)
            x0 = self.teacher_x0(teacher, x, t, text, act, guidance, **fc)
            v = L.flow_from_x0(x, x0, t)
            x = L.euler_step(x, v, t, torch.full((B, Fr), b, device=x.device))
        return x

    @torch.no_grad()
    def decode(self, z):
        return self.ae.decode(z)[0]

    def student_sample(self, model, g):
        """The inference loop (streaming.rollout) on a held-out clip: GT | student."""
        x0, text, act = self.batch(0, held_out=True)
        x0, text, act = x0[:1], text[:1], None if act is None else act[:1]
        was = model.training
        model.eval()
        cache = new_cache(self.pcfg, 1, self.device)
        with torch.no_grad():
            cache.cross_kv = model.cross_kv(text)
            shape = (1, self.k) + x0.shape[2:]
            z = inference_rollout(model, cache, self.sampler, self.randn(x0.shape, g),
                                  lambda: self.randn(shape, g), act)
        model.train(was)
        return _side_by_side(self.decode(x0), self.decode(z))

    def release_dit(self, out_dir, sd):
        save_release(os.path.join(out_dir, "release.safetensors"), sd, self.release_config())


class TeacherStage(LatentStage):
    """Bidirectional DiT by flow matching with per-chunk timesteps and CFG dropout."""

    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        m = load_dit(self.pcfg, cfg.init if cfg.init not in ("", "teacher") else None, dist, cfg.init_reset)
        if self.ckpt_act:
            enable_grad_checkpointing(m)
        self.mods["dit"] = dist.prepare(m)
        self.opts["dit"] = adamw(m, cfg.optim)
        self.init_ema(m)

    mask = "bidirectional"

    def step(self, step):
        m, g, c = self.mods["dit"], self.gen(step), self.cfg
        x0, text, act = self.batch(step)
        B, Fr = x0.shape[:2]
        t = L.sample_timesteps(B, Fr, shift=c.shift, t_min=c.t_min, t_max=c.t_max,
                               high_p=c.t_high_p, high_min=c.t_high_min, per=c.timestep_per,
                               chunk_frames=self.k, generator=g).to(self.device)
        clean = L.clean_chunk_mask(B, -(-Fr // self.k), c.clean_chunks, c.clean_p, g)
        t, w = L.apply_clean_chunks(t, clean, self.k)
        eps = self.randn(x0.shape, g)
        text_in, act_in = text, act
        text, _ = L.cfg_dropout(text, c.text_dropout, g)
        if act is not None:
            act, _ = L.cfg_dropout(act, c.action_dropout, g)
        kw = self.mask_kw() if self.mask == "block_causal" else {}
        kw.update(self.frame_cond(x0, g, noise=True))
        x_in = L.noise_latents(x0, eps, t)
        if self.mask == "block_causal" and c.context_source == "self":
            x_in = L.mix_context(x_in, self.own_rollout(m, x0, text_in, act_in, g), clean, self.k)
        with self.autocast():
            v = m(x_in, t, text, action=act, **kw)
            loss = L.flow_matching_loss(v, x0, eps, weight=w)
        gn = self.update("dit", loss, step, c.optim)
        self.ema_step(m, step)
        return {"loss": loss.item(), "grad_norm": gn}

    def sample(self, step):
        g = self.gen(step, salt=9)
        x0, text, act = self.batch(0, held_out=True)
        z = self.teacher_sample(_with_ema(self.mods["dit"], self.ema), self.randn(x0[:1].shape, g), text[:1],
                                None if act is None else act[:1], steps=24, guidance=self.cfg.guidance,
                                **self.frame_cond(x0[:1]))
        return _side_by_side(self.decode(x0[:1]), self.decode(z))

    def export(self, out_dir):
        self.release_dit(out_dir, self.ema_state_dict(self.mods["dit"]))


class CausalInitStage(TeacherStage):
    """Causal student init: the teacher's weights trained block-causally by flow matching with
    clean context chunks (``clean_chunks``): a noisy chunk after clean ones is teacher forcing,
    after noisy ones diffusion forcing. Samples use the streaming inference loop."""

    mask = "block_causal"

    def __init__(self, cfg, dist):
        if cfg.init in ("", "teacher"):
            cfg = dataclasses.replace(cfg, init=cfg.teacher)
        super().__init__(cfg, dist)
        self.timesteps = self.sampler.timesteps                       # warped few-step list (own rollouts)

    def sample(self, step):
        return self.student_sample(_with_ema(self.mods["dit"], self.ema), self.gen(step, salt=9))

    @torch.no_grad()
    def own_rollout(self, m, x0, text, act, g) -> torch.Tensor:
        """The student's own latents for the clip: the inference loop through its cache from
        max(start_chunks, 1) real chunks (``context_source: self``). -> [B, F, C, H, W]."""
        B = x0.shape[0]
        m = getattr(m, "module", m)                                       # DDP wrapper
        was = m.training
        m.eval()
        cache = new_cache(self.pcfg, B, self.device)
        with self.autocast():
            cache.cross_kv = m.cross_kv(text)
        own = rollout(m, cache, self.timesteps, self.randn(x0.shape, g), lambda s: self.randn(s, g),
                          len(self.timesteps) - 1, act, context="self", gt=x0, grad=False,
                          context_noise=self.pcfg.sampler.context_noise,
                          start_frames=max(self.cfg.start_chunks, 1) * self.k)
        m.train(was)
        return own.float()


def _with_ema(model, ema):
    """A copy of ``model`` carrying the EMA weights (for samples)."""
    src = getattr(model, "module", model)
    m = WanDiT(src.cfg).to(next(src.parameters()).device)     # not deepcopy: configs hold read-only tables
    m.load_state_dict(src.state_dict(), strict=False)
    if hasattr(src, "attn_backend"):
        m.attn_backend = src.attn_backend
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(ema[k])
    return m.eval()


class StudentStage(LatentStage):
    """Common to the causal students: teacher (frozen), generator (+EMA)."""

    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        self.teacher = frozen(load_dit(self.pcfg, cfg.teacher, dist))
        init = cfg.teacher if cfg.init in ("", "teacher") else cfg.init
        gmod = load_dit(self.pcfg, init, dist, cfg.init_reset)
        if self.ckpt_act and cfg.stage not in ("dmd", "teacher_forcing", "diffusion_forcing"):
            # not in cache rollouts: a recomputed block would read the cache's index tensors of a
            # later chunk (wrong gradients, found by benchmarks/gpu's rehearsal)
            enable_grad_checkpointing(gmod)
        self.mods["generator"] = dist.prepare(gmod)
        self.opts["generator"] = adamw(gmod, cfg.optim)
        self.init_ema(gmod)
        self.timesteps = self.sampler.timesteps                       # warped few-step list

    def sample(self, step):
        return self.student_sample(_with_ema(self.mods["generator"], self.ema), self.gen(step, salt=9))

    def export(self, out_dir):
        self.release_dit(out_dir, self.ema_state_dict(self.mods["generator"]))


class OdeInitStage(StudentStage):
    """Causal ODE regression on stored teacher trajectories (CausVid / Self-Forcing ode_init)."""

    def __init__(self, cfg, dist):
        if cfg.pipeline_config().model.frame_cond != "none":
            raise ConfigError("ode_init does not support frame_cond models (a teacher trajectory has no "
                              "clean previous frame); use causal_init or consistency")
        super().__init__(cfg, dist)
        self.traj = self._trajectories()

    @torch.no_grad()
    def _trajectories(self) -> dict:
        path = os.path.join(self.cfg.out, f"trajectories-r{self.dist.rank}.pt")
        if os.path.exists(path):
            return torch.load(path, weights_only=True)
        c, n = self.cfg, self.cfg.ode_samples
        grid = sorted(set(L.ode_timesteps(c.ode_steps, c.shift)) | set(self.timesteps), reverse=True)
        g = self.gen(-1, salt=3)
        xs, finals, texts, acts = [], [], [], []
        for s in range(0, n, 32):
            idx = torch.randint(0, self.n, (min(32, n - s),), generator=g)
            text = self.data["text"][idx].to(self.device)
            act = self.data["actions"][idx].to(self.device) if self.pcfg.model.actions.enabled else None
            x = self.randn((len(idx),) + tuple(self.data["latents"].shape[1:]), g)
            B, Fr = x.shape[:2]
            keep = []
            for a, b in zip(grid[:-1], grid[1:]):
                if a in self.timesteps:
                    keep.append(x.cpu())
                t = torch.full((B, Fr), a, device=x.device)
                x0 = self.teacher_x0(self.teacher, x, t, text, act, c.guidance, **self.score_kw())
                x = L.euler_step(x, L.flow_from_x0(x, x0, t), t, torch.full((B, Fr), b, device=x.device))
            xs.append(torch.stack(keep, 1))                                 # [b, S, F, C, h, w]
            finals.append(x.cpu())
            texts.append(text.cpu())
            acts.append(None if act is None else act.cpu())
        out = {"x_t": torch.cat(xs), "x0": torch.cat(finals), "text": torch.cat(texts)}
        if acts[0] is not None:
            out["actions"] = torch.cat(acts)
        os.makedirs(self.cfg.out, exist_ok=True)
        tmp = path + ".tmp"
        torch.save(out, tmp)
        os.replace(tmp, path)
        return out

    def step(self, step):
        m, g, c = self.mods["generator"], self.gen(step), self.cfg
        tr = self.traj
        idx = torch.randint(0, tr["x0"].shape[0], (c.batch_size,), generator=g)
        x_all, target = tr["x_t"][idx].to(self.device), tr["x0"][idx].to(self.device)    # [B, S, F, ...]
        B, S, Fr = x_all.shape[:3]
        nchunk = -(-Fr // self.k)
        which = torch.randint(0, S, (B, nchunk), generator=g).repeat_interleave(self.k, 1)[:, :Fr]   # [B, F]
        x_t = torch.gather(x_all, 1, which.to(self.device)[:, None, :, None, None, None]
                           .expand(B, 1, Fr, *x_all.shape[3:]))[:, 0]
        ts = torch.tensor(self.timesteps, device=self.device)[which.to(self.device)]   # [B, F]
        act = tr["actions"][idx].to(self.device) if "actions" in tr else None
        with self.autocast():
            v = m(x_t, ts, tr["text"][idx].to(self.device), action=act, **self.mask_kw())
            loss = L.ode_regression_loss(L.x0_from_flow(x_t, v.float(), ts), target)
        gn = self.update("generator", loss, step, c.optim)
        self.ema_step(m, step)
        return {"loss": loss.item(), "grad_norm": gn}


class ConsistencyStage(StudentStage):
    """Causal consistency distillation: one online teacher ODE step t_i -> t_{i+1}, no stored trajectories."""

    def step(self, step):
        m, g, c = self.mods["generator"], self.gen(step), self.cfg
        x0, text, act = self.batch(step)
        B, Fr = x0.shape[:2]
        steps = self.timesteps + [0.0]
        nchunk = -(-Fr // self.k)
        i = torch.randint(0, len(self.timesteps), (B, nchunk), generator=g).repeat_interleave(self.k, 1)[:, :Fr]
        t_a = torch.tensor(steps, device=self.device)[i.to(self.device)]
        t_b = torch.tensor(steps, device=self.device)[(i + 1).to(self.device)]
        x_a = L.noise_latents(x0, self.randn(x0.shape, g), t_a)
        with torch.no_grad():
            fc = self.frame_cond(x0)
            tx0 = self.teacher_x0(self.teacher, x_a, t_a, text, act, c.guidance, **self.score_kw(), **fc)
            x_b = L.euler_step(x_a, L.flow_from_x0(x_a, tx0, t_a), t_a, t_b)
            ema = _with_ema(m, self.ema)
            with self.autocast():
                tgt = L.x0_from_flow(x_b, ema(x_b, t_b.clamp_min(1e-3), text, action=act, **self.mask_kw(),
                                              **fc).float(),
                                     t_b)
            last = (t_b == 0)[:, :, None, None, None]
            tgt = torch.where(last, x_b, tgt)
        with self.autocast():
            pred = L.x0_from_flow(x_a, m(x_a, t_a, text, action=act, **self.mask_kw(), **fc).float(), t_a)
            loss = L.ode_regression_loss(pred, tgt)
        gn = self.update("generator", loss, step, c.optim)
        self.ema_step(m, step)
        return {"loss": loss.item(), "grad_norm": gn}


class DMDStage(StudentStage):
    """Self-forcing DMD (context "self"); with context "clean"/"noisy" the Teacher Forcing /
    Diffusion Forcing baselines of the Self-Forcing paper (same objective, other context)."""

    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        critic = load_dit(self.pcfg, cfg.teacher, dist)
        if self.ckpt_act:
            enable_grad_checkpointing(critic)
        self.mods["critic"] = dist.prepare(critic)
        self.opts["critic"] = adamw(critic, cfg.critic_optim)

    def _rollout(self, x0_gt, text, act, g, grad: bool):
        gm, c = self.mods["generator"], self.cfg
        B, Fr = x0_gt.shape[:2]
        exit_step = L.sample_exit_step(len(self.timesteps), g)
        cache = new_cache(self.pcfg, B, self.device)
        ctx_t = None
        if c.context == "noisy":
            ctx_t = L.sample_timesteps(B, -(-Fr // self.k), shift=c.shift, t_min=0.0, t_max=c.t_max,
                                       per="frame", generator=g).to(self.device)
        with torch.set_grad_enabled(grad), self.autocast():
            cache.cross_kv = gm.cross_kv(text)
            x = rollout(gm, cache, self.timesteps, self.randn(x0_gt.shape, g), lambda s: self.randn(s, g),
                        exit_step, act, context=c.context, gt=x0_gt, context_t=ctx_t,
                        context_noise=self.pcfg.sampler.context_noise, grad=grad,
                        start_frames=c.start_chunks * self.k)
        return x.float(), exit_step

    def step(self, step):
        c, g = self.cfg, self.gen(step)
        x0_gt, text, act = self.batch(step)
        B, Fr = x0_gt.shape[:2]
        out = {}
        gen_step = step % c.gen_every == 0
        x, exit_step = self._rollout(x0_gt, text, act, g, grad=gen_step)
        P = min(c.start_chunks * self.k, Fr)                          # real opening frames (clean, no loss)
        start = (torch.arange(-(-Fr // self.k)) < c.start_chunks)[None].expand(B, -1)
        if gen_step:
            t = L.sample_timesteps(B, Fr, shift=c.shift, t_min=c.t_min, t_max=c.t_max,
                               high_p=c.t_high_p, high_min=c.t_high_min, per="clip",
                                   generator=g).to(self.device)
            t, _ = L.apply_clean_chunks(t, start, self.k)
            with torch.no_grad():
                x_t = L.noise_latents(x.detach(), self.randn(x.shape, g), t)
                kw = dict(self.score_kw(), **self.frame_cond(x.detach()))
                with self.autocast():
                    fake = L.x0_from_flow(x_t, self.mods["critic"](x_t, t, text, action=act, **kw).float(), t)
                real = self.teacher_x0(self.teacher, x_t, t, text, act, c.guidance, **kw)
                grad = L.dmd_gradient(x[:, P:].detach(), fake[:, P:], real[:, P:])
            loss = L.dmd_loss(x[:, P:], grad)
            out["dmd_loss"] = loss.item()
            out["gen_grad_norm"] = self.update("generator", loss, step, c.optim)
            self.ema_step(self.mods["generator"], step)
        # critic: flow matching on the detached rollout, every step
        t = L.sample_timesteps(B, Fr, shift=c.shift, t_min=c.t_min, t_max=c.t_max,
                               high_p=c.t_high_p, high_min=c.t_high_min, per=c.timestep_per,
                               chunk_frames=self.k, generator=g).to(self.device)
        t, w = L.apply_clean_chunks(t, start, self.k)
        eps = self.randn(x.shape, g)
        with self.autocast():
            v = self.mods["critic"](L.noise_latents(x.detach(), eps, t), t, text, action=act, **self.score_kw(),
                                    **self.frame_cond(x.detach()))
            closs = L.critic_loss(v, x.detach(), eps, weight=w)
        out["critic_loss"] = closs.item()
        out["critic_grad_norm"] = self.update("critic", closs, step, c.critic_optim)
        out["exit_step"] = exit_step
        return out


STAGE_CLASSES = {"autoencoder": AutoencoderStage, "teacher": TeacherStage, "causal_init": CausalInitStage,
                 "ode_init": OdeInitStage,
                 "consistency": ConsistencyStage, "dmd": DMDStage, "teacher_forcing": DMDStage,
                 "diffusion_forcing": DMDStage}


def build_stage(cfg: RunConfig, dist: Dist) -> Stage:
    if cfg.stage == "teacher_forcing":
        cfg = dataclasses.replace(cfg, context="clean")
    elif cfg.stage == "diffusion_forcing":
        cfg = dataclasses.replace(cfg, context="noisy")
    return STAGE_CLASSES[cfg.stage](cfg, dist)
