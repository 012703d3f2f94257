"""The tiny-ae training stage (``stage: autoencoder``)."""
from __future__ import annotations

import os

import torch

from ..codecs.autoencoder import TinyAutoencoder
from ..errors import ConfigError
from ..io.checkpoint import read_weights, save_release
from . import losses as L
from .data import batch_indices, load_frames, to_video
from .distributed import full_state_dict
from .stage_base import HELD_OUT, Stage, _side_by_side, adamw


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
