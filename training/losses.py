"""Pure training formulas (no modules, no I/O); each one is checked on a hand-computed case.

Conventions (Wan / Self-Forcing, as streamgen.engine.sampling, whose ``add_noise``/``to_x0`` the
per-frame forms here call): x_t = (1 - s) x0 + s eps with s = t / 1000, the model predicts
the flow v = eps - x0, so x0 = x_t - s v.
Shapes: latents [B, F, C, H, W], timesteps t [B, F] in [0, 1000].
"""
from __future__ import annotations

import math

import torch

from ..engine.sampling import add_noise, shift_sigma, to_x0
from ..models.model import previous_chunk_last


# ------------------------------------------------------------------ timesteps
def sample_timesteps(batch: int, frames: int, *, shift: float = 5.0, t_min: float = 20.0,
                     t_max: float = 980.0, per: str = "clip", chunk_frames: int = 3,
                     generator: torch.Generator | None = None, high_p: float = 0.0,
                     high_min: float = 900.0) -> torch.Tensor:
    """Timesteps [B, F]: u ~ U(0,1) per clip | chunk | frame, shifted, then clamped to [t_min, t_max].

    t = clamp(1000 * shift*u / (1 + (shift-1)*u), t_min, t_max). With ``high_p`` > 0 each
    draw is instead U(high_min, t_max) with probability ``high_p``: more of the loss where
    the sample's layout (and the actions' effect on it) is decided.
    """
    n = {"clip": 1, "chunk": -(-frames // chunk_frames), "frame": frames}.get(per)
    if n is None:
        raise ValueError(f"per must be 'clip', 'chunk' or 'frame', got {per!r}")
    reps = {"clip": frames, "chunk": chunk_frames, "frame": 1}[per]
    t = shifted_timesteps(torch.rand(batch, n, generator=generator), shift, t_min, t_max)   # [B, n]
    if high_p > 0:
        if not t_min <= high_min < t_max:
            raise ValueError(f"need t_min <= high_min < t_max, got {high_min}")
        hi = high_min + (t_max - high_min) * torch.rand(batch, n, generator=generator)
        t = torch.where(torch.rand(batch, n, generator=generator) < high_p, hi, t)
    return t.repeat_interleave(reps, 1)[:, :frames].contiguous()


def shifted_timesteps(u: torch.Tensor, shift: float, t_min: float = 20.0, t_max: float = 980.0) -> torch.Tensor:
    return (1000.0 * shift_sigma(u, shift)).clamp(t_min, t_max).contiguous()


def clean_chunk_mask(batch: int, n_chunks: int, mode: str, p: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Which chunks are clean context, bool [B, n_chunks] (True = clean data at t = 0, no loss).

    "none": no chunk. "prefix": with probability p the first L chunks, L ~ U{1..n-1}.
    "bernoulli": each chunk with probability p; if every chunk of a clip came up clean, its
    last chunk is made noisy (each clip keeps something to learn).
    """
    if mode == "none" or n_chunks < 2:
        return torch.zeros(batch, n_chunks, dtype=torch.bool)
    if mode == "prefix":
        on = torch.rand(batch, generator=generator) < p
        length = torch.randint(1, n_chunks, (batch,), generator=generator) * on
        return torch.arange(n_chunks)[None, :] < length[:, None]
    if mode == "bernoulli":
        m = torch.rand(batch, n_chunks, generator=generator) < p
        m[:, -1] &= ~m.all(dim=1)
        return m
    raise ValueError(f"mode must be 'none', 'prefix' or 'bernoulli', got {mode!r}")


def apply_clean_chunks(t: torch.Tensor, clean: torch.Tensor, chunk_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [B, F] and clean [B, n_chunks] -> (t with clean frames at 0, loss weight [B, F]).

    The weight is 1 on noisy frames and 0 on clean ones, scaled so that it averages to 1
    (a batch whose frames are all clean gets weight 0)."""
    frames = t.shape[1]
    cf = clean.to(t.device).repeat_interleave(chunk_frames, 1)[:, :frames]     # [B, F]
    t = torch.where(cf, torch.zeros_like(t), t)
    w = (~cf).float()
    return t, w / w.mean().clamp_min(1e-8) * (w.sum() > 0)


def mix_context(noisy: torch.Tensor, own: torch.Tensor, clean: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """Own-context training input: the clean chunks (clean [B, n_chunks] True) come from ``own``
    (the model's own rollout, as at inference), the others from ``noisy`` (noised data).

    noisy, own [B, F, C, H, W] -> [B, F, C, H, W]."""
    cf = clean.to(noisy.device).repeat_interleave(chunk_frames, 1)[:, :noisy.shape[1]]  # [B, F]
    return torch.where(cf[:, :, None, None, None], own.to(noisy.dtype), noisy)


def self_chain(denoise, x0: torch.Tensor, noisy: torch.Tensor, timesteps, j: int, draw) -> torch.Tensor:
    """The input a noisy chunk has at step j of the few-step sampler (``chain_source: self``).

    x0 [B, F, C, H, W] the clean latents; noisy [B, F] True on the frames being denoised (the others
    stay x0: clean context); ``denoise(x, t) -> x0_hat`` with t [B, F]. Noisy frames start as pure
    noise at timesteps[0]; each of the first j steps predicts x0 and re-noises it with fresh noise
    ``draw(shape)`` to the next timestep, as :func:`streamgen.engine.sampling.advance` does.
    -> x at timesteps[j] on the noisy frames."""
    m = noisy[:, :, None, None, None]
    x = torch.where(m, draw(x0.shape).to(x0.dtype), x0)
    for i in range(j):
        t = torch.where(noisy, torch.full_like(noisy, timesteps[i], dtype=torch.float32), 0.0)
        x_next = add_noise(denoise(x, t).to(x0.dtype), draw(x0.shape).to(x0.dtype), timesteps[i + 1] / 1000.0)
        x = torch.where(m, x_next, x0)
    return x


def implied_noise(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The eps with x_t = (1 - s) x0 + s eps (s = t/1000 per frame [B, F]); frames at t = 0 get 0.
    With it, ``flow_matching_loss(v, x0, eps)`` asks x_t - s v = x0 of any input x_t."""
    s = sigma_of(t).to(x_t.dtype)
    return torch.where(s > 0, (x_t - (1 - s) * x0) / s.clamp_min(1e-6), torch.zeros_like(x_t))


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """[B, F] timesteps -> sigmas broadcastable to latents [B, F, 1, 1, 1]."""
    return (t / 1000.0)[:, :, None, None, None]


def noise_latents(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s eps with per-frame s = t/1000 (the sampler's ``add_noise``)."""
    return add_noise(x0, eps, sigma_of(t).to(x0.dtype))


def x0_from_flow(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - s v (per-frame s; the sampler's ``to_x0`` in the inputs' dtypes)."""
    return to_x0(x_t, v, sigma_of(t).to(v.dtype), compute_dtype=None)


def flow_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x_t - x0) / s, the flow that maps x_t to x0 (s > 0)."""
    return (x_t - x0) / sigma_of(t).to(x0.dtype)


# ------------------------------------------------------------------ flow matching
def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean over everything of w * (v_pred - (eps - x0))^2; ``weight`` [B, F] per frame (optional)."""
    err = (v_pred.float() - (eps.float() - x0.float())).pow(2)
    if weight is not None:
        err = err * weight[:, :, None, None, None]
    return err.mean()


def edge_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical pixel differences of two [..., H, W] images
    (a gradient-difference loss: blur that plain L1/MSE tolerates costs here)."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]
    p, t = pred.float(), target.float()
    return 0.5 * ((dx(p) - dx(t)).abs().mean() + (dy(p) - dy(t)).abs().mean())


def cfg_dropout(text: torch.Tensor, p: float, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's conditioning by zeros with probability p (the "uncond" embedding).

    text [B, ...]; returns (dropped, keep [B] bool). ``mask`` overrides the random draw.
    """
    if mask is None:
        mask = torch.rand(text.shape[0], generator=generator) >= p
    keep = mask.to(text.device)
    return text * keep.view(-1, *([1] * (text.dim() - 1))).to(text.dtype), keep


def frame_cond_input(x0: torch.Tensor, chunk_frames: int, noise_max: float, eps: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """What a ``frame_cond="last"`` model sees besides its noisy chunk: the previous chunk's last
    clean frame (zeros in the first chunk) plus s * eps, s ~ U(0, noise_max) per clip.

    x0, eps [B, F, C, H, W] -> [B, F, C, H, W]."""
    cond = previous_chunk_last(x0, chunk_frames)
    if noise_max <= 0:
        return cond
    s = torch.rand(x0.shape[0], generator=generator).to(x0.device) * noise_max            # [B]
    has = (cond != 0).flatten(2).any(-1)[:, :, None, None, None]                         # [B, F, 1, 1, 1]
    return cond + has * s.view(-1, 1, 1, 1, 1) * eps


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Self-Forcing's real-score guidance: cond + g * (cond - uncond) (g=0: no guidance)."""
    return cond + guidance * (cond - uncond)


# ------------------------------------------------------------------ DMD
def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """DMD gradient (fake - real) / mean|x - real|, normaliser per sample over (F, C, H, W)."""
    dims = tuple(range(1, x.dim()))
    norm = (x.double() - real_x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    grad = (fake_x0.double() - real_x0.double()) / norm
    return torch.nan_to_num(grad)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean (x - stopgrad(x - grad))^2: its gradient w.r.t. x is grad / numel."""
    target = (x.double() - grad.double()).detach()
    return 0.5 * (x.double() - target).pow(2).mean()


def critic_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fake-score (critic) objective: flow matching on detached generator samples."""
    return flow_matching_loss(v_pred, x0.detach(), eps, weight)


def ode_regression_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """CausVid / Self-Forcing ode_init: MSE between predicted and teacher-trajectory x0."""
    return (x0_pred.float() - x0_target.float()).pow(2).mean()


# ------------------------------------------------------------------ few-step schedule helpers
def sample_exit_step(num_steps: int, generator: torch.Generator | None = None) -> int:
    """One exit step in {0, ..., num_steps-1}, uniform, shared by every chunk of a rollout."""
    return int(torch.randint(0, num_steps, (1,), generator=generator).item())


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """One flow ODE step: x_{t_to} = x_t + (s_to - s_from) v (per-frame sigmas)."""
    return x_t + (sigma_of(t_to) - sigma_of(t_from)).to(v.dtype) * v


def ode_timesteps(num_steps: int, shift: float) -> list[float]:
    """``num_steps`` + 1 decreasing timesteps of the shifted schedule, 1000 -> 0."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return [float(v) for v in 1000.0 * shift_sigma(u, shift)]


# ------------------------------------------------------------------ EMA
@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place (decay=0 copies)."""
    for k, p in params.items():
        ema[k].mul_(decay).add_(p.detach().to(ema[k].dtype), alpha=1.0 - decay)


def ema_decay_at(step: int, decay: float, start: int) -> float:
    """Self-Forcing: the EMA starts at ``start`` (a copy), then decays by ``decay`` per update."""
    return 0.0 if step <= start else decay


def lr_at(step: int, total: int, lr: float, warmup: int = 0, schedule: str = "constant",
          min_ratio: float = 0.1) -> float:
    """Learning rate for 0-based ``step`` of ``total``: linear warmup, then constant or cosine
    decay from ``lr`` to ``min_ratio * lr`` at the last step."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return lr
    p = min(1.0, (step - warmup) / (total - warmup - 1))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


# ------------------------------------------------------------------ adversarial (sharpness + keys)
def transition_pairs(x0: torch.Tensor, x0_hat: torch.Tensor, noisy: torch.Tensor,
                     judged: torch.Tensor | None = None):
    """The frame transitions an adversarial critic judges: every noisy frame f >= 1 (or, with
    ``judged`` [B, F] bool, every judged frame f >= 1; judged frames must be noisy).

    x0 (data), x0_hat (the model's x0) [B, F, C, H, W]; noisy [B, F] bool. -> real [N, 2, C, H, W]
    (data frame f-1, data frame f), fake [N, 2, C, H, W] (frame f-1 as the model would see it at
    inference: its own x0 where f-1 is noisy, data where it is clean context; its own frame f),
    and (b, f) [N] indices (to gather each transition's action)."""
    prev_fake = torch.where(noisy[:, :-1, None, None, None], x0_hat[:, :-1], x0[:, :-1])   # [B, F-1, ...]
    judged = noisy if judged is None else judged & noisy
    b, f = torch.nonzero(judged[:, 1:], as_tuple=True)                                      # frame f = f + 1
    real = torch.stack([x0[b, f], x0[b, f + 1]], 1)
    fake = torch.stack([prev_fake[b, f], x0_hat[b, f + 1]], 1)
    return real, fake, b, f + 1


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Critic hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean D(fake)."""
    return -fake_logits.mean()
