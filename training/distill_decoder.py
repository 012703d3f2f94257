"""Distil the Wan VAE decoder into the small TAEHV-style causal decoder (streamgen.codecs.taehv).

    python -m streamgen.training.distill_decoder --vae-path /models/Wan2.1-T2V-1.3B/vae \\
        --latents latents.safetensors --out taehv.safetensors --steps 20000 --device cuda

Teacher: ``WanVAE`` (diffusers AutoencoderKLWan from a local directory). Student: ``TAEHV``.
Each step takes a clip of Wan-normalised latents [B, F, C, h, w], decodes it with the teacher
(no grad, causal, exact) and trains the student's full decode to match it (MSE + L1 on
pixels). The student's chunked decode equals its full decode, so training on whole clips
trains the streaming decoder.

Latent sources (``--latents``): ``gaussian`` (N(0, 1) latents: the normalised latent prior;
weak but needs no data), or a ``.safetensors``/``.pt`` file holding a tensor ``latents``
[N, F, C, h, w] (encode real videos with ``WanVAE.encode`` for a good decoder). Use the
result with ``--vae taehv --vae-path taehv.safetensors``.

Smoke run on CPU (tiny random teacher): ``--teacher-config tiny --student-channels 16,16,8,8``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from streamgen.errors import ConfigError, StreamgenError
from streamgen.codecs.taehv import TAEHV, TAEHVConfig
from streamgen.codecs.vae import WanVAE

TINY_TEACHER = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                    temperal_downsample=[False, True, True],
                    latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m streamgen.training.distill_decoder", description=__doc__.split("\n")[0])
    ap.add_argument("--vae-path", default=None, help="local AutoencoderKLWan directory (the teacher)")
    ap.add_argument("--teacher-config", default=None, help="'tiny' (random tiny teacher, for smoke runs) or a JSON dict")
    ap.add_argument("--latents", default="gaussian", help="'gaussian' or a file with a 'latents' tensor [N,F,C,h,w]")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent-frames", type=int, default=3)
    ap.add_argument("--latent-height", type=int, default=60)
    ap.add_argument("--latent-width", type=int, default=104)
    ap.add_argument("--student-channels", default="256,128,64,64")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    return ap


def _teacher(args) -> WanVAE:
    if args.vae_path:
        return WanVAE(args.vae_path, device=args.device)
    if args.teacher_config is None:
        raise ConfigError("give the teacher: --vae-path DIR (or --teacher-config tiny for a smoke run)")
    cfg = TINY_TEACHER if args.teacher_config == "tiny" else json.loads(args.teacher_config)
    return WanVAE(config=cfg, device=args.device)


def _latent_source(args, channels: int):
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.latent_frames, channels, args.latent_height, args.latent_width)
    if args.latents == "gaussian":
        return lambda: torch.randn(shape, generator=g)
    from streamgen.io.checkpoint import read_weights
    data, _ = read_weights(args.latents)
    lat = data.get("latents")
    if not isinstance(lat, torch.Tensor) or lat.dim() != 5 or lat.shape[2] != channels:
        raise ConfigError(f"{args.latents}: needs a tensor 'latents' [N, F, {channels}, h, w]")
    F_ = min(args.latent_frames, lat.shape[1])

    def draw():
        i = torch.randint(0, lat.shape[0], (args.batch,), generator=g)
        s = int(torch.randint(0, lat.shape[1] - F_ + 1, (), generator=g))
        return lat[i, s:s + F_].float()
    return draw


def distill(args) -> dict:
    torch.manual_seed(args.seed)
    teacher = _teacher(args)
    channels = tuple(int(c) for c in args.student_channels.split(","))
    student = TAEHV(TAEHVConfig(latent_channels=teacher.latent_channels, channels=channels)).to(args.device)
    if (student.spatial_stride, student.temporal_stride) != (teacher.spatial_stride, teacher.temporal_stride):
        raise ConfigError("student and teacher strides differ")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    draw = _latent_source(args, teacher.latent_channels)
    losses, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        z = draw().to(args.device)
        with torch.no_grad():
            target = teacher.decode(z)                                    # [B, T, 3, H, W]
        pred = student(z)
        loss = F.mse_loss(pred, target) + 0.1 * F.l1_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {sum(losses[-args.log_every:]) / len(losses[-args.log_every:]):.5f} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr)
    student.save(args.out)
    return {"out": args.out, "steps": args.steps, "first_loss": losses[0], "last_loss": losses[-1], "losses": losses}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = distill(args)
    except StreamgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in res.items() if k != "losses"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
