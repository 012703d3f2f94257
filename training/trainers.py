"""Training stages on latent data (teacher, causal init, ODE init, consistency, DMD) and
``build_stage``. They only orchestrate: every formula lives in ``losses.py``, the self-forcing
rollout in ``rollout.py``; the ``Stage`` base and shared helpers in ``stage_base.py``, the
tiny-ae stage in ``stage_autoencoder.py``.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ..errors import ConfigError
from ..io.checkpoint import save_release
from ..models.model import WanDiT
from ..engine.sampling import FewStepSampler
from ..engine.chunk_step import rollout as inference_rollout
from . import losses as L
from .config import RunConfig
from .data import batch_indices, load_latents
from .discriminator import TransitionCritic
from .distributed import Dist
from .rollout import new_cache, rollout
from .stage_autoencoder import AutoencoderStage
from .stage_base import (HELD_OUT, Stage, _side_by_side, adamw, enable_grad_checkpointing, frozen,  # noqa: F401
                         load_autoencoder, load_dit)


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
        if self.mask == "block_causal" and c.chain_source == "self" and torch.rand((), generator=g) < c.chain_p:
            x_in, t, eps = self.chain_input(m, x0, t, text, act, kw, g)
        if self.mask == "block_causal" and c.context_source == "self":
            x_in = L.mix_context(x_in, self.own_rollout(m, x0, text_in, act_in, g), clean, self.k)
        with self.autocast():
            v = m(x_in, t, text, action=act, **kw)
            loss = L.flow_matching_loss(v, x0, eps, weight=w)
        total, logs = loss, {}
        if "disc" in self.mods:
            adv, logs = self.adversarial(x0, L.x0_from_flow(x_in, v.float(), t), t, act_in, step, g)
            total = loss + adv
        gn = self.update("dit", total, step, c.optim)
        self.ema_step(m, step)
        return {"loss": loss.item(), "grad_norm": gn, **logs}

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
        if cfg.adv_weight > 0:
            a = self.pcfg.model.actions
            d = TransitionCritic(self.pcfg.model.in_channels, self.data["actions"].shape[-1] if a.enabled else 0,
                                 cfg.adv_width).to(self.device)
            self.mods["disc"] = dist.prepare(d)
            self.opts["disc"] = adamw(d, cfg.critic_optim)

    def adversarial(self, x0, x0_hat, t, act, step, g):
        """``adv_weight``: one critic update on this batch's transitions (data real; the student's
        detached, and data with shuffled keys, fake), then the student's hinge loss through the
        critic. x0, x0_hat [B, F, C, H, W], t [B, F] (0 = clean context; frames with t >
        ``adv_t_max`` are not judged), act [B, F, A]. -> (weighted loss, logs)."""
        c, d = self.cfg, self.mods["disc"]
        real, fake, b, f = L.transition_pairs(x0.float(), x0_hat, t > 0, t <= c.adv_t_max)
        if real.shape[0] == 0:
            return x0_hat.sum() * 0, {}
        a = None if act is None else act[b, f].float()                    # [N, A]
        d.requires_grad_(True)
        d_real, d_fake = d(real, a), d(fake.detach(), a)
        d_loss = L.hinge_d_loss(d_real, d_fake)
        if a is not None and c.adv_mismatch > 0 and a.shape[0] > 1:
            perm = torch.randperm(a.shape[0], generator=g).to(a.device)
            d_loss = d_loss + c.adv_mismatch * torch.relu(1 + d(real, a[perm])).mean()
        self.update("disc", d_loss, step, c.critic_optim)
        logs = {"d_loss": d_loss.item(), "d_real": d_real.mean().item(), "d_fake": d_fake.mean().item()}
        if step < c.adv_start:
            return x0_hat.sum() * 0, logs
        d.requires_grad_(False)                                           # the student's loss only
        g_loss = L.hinge_g_loss(d(fake, a))
        d.requires_grad_(True)
        logs["g_adv"] = g_loss.item()
        return c.adv_weight * g_loss, logs

    def sample(self, step):
        return self.student_sample(_with_ema(self.mods["dit"], self.ema), self.gen(step, salt=9))

    @torch.no_grad()
    def chain_input(self, m, x0, t, text, act, kw, g):
        """``chain_source: self``: every noisy frame at the sampler's step j (uniform in 1..steps-1),
        its input built from the model's own first j steps (:func:`losses.self_chain`), and the
        noise that input implies against the true x0. -> (x_in, t, eps)."""
        ts = self.timesteps
        j = int(torch.randint(1, len(ts), (), generator=g))
        noisy = t > 0                                                     # [B, F]
        was = m.training
        m.eval()

        def denoise(x, tt):
            with self.autocast():
                v = m(x, tt, text, action=act, **kw)
            return L.to_x0(x, v.float(), L.sigma_of(tt), compute_dtype=None)

        x_in = L.self_chain(denoise, x0, noisy, ts, j, lambda s: self.randn(s, g))
        m.train(was)
        t = torch.where(noisy, torch.full_like(t, ts[j]), t)
        return x_in, t, L.implied_noise(x_in, x0, t)

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
