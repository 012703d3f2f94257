"""The Wan VAE path (diffusers' AutoencoderKLWan, tiny random config): chunked causal decode."""
from __future__ import annotations

import pytest
import torch

from streamgen.errors import ConfigError
from streamgen.codecs.factory import build_vae
from streamgen.codecs.vae import WanVAE

TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 1.0, 2.0])


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(config=TINY_VAE)


def test_strides_and_encode_shape(vae):
    assert (vae.latent_channels, vae.spatial_stride, vae.temporal_stride) == (4, 8, 4)
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1                          # [B, T, 3, H, W]
    z = vae.encode(video)
    assert z.shape == (1, 3, 4, 4, 4)                                     # 1 + 2*4 frames -> 3 latents


def test_full_decode_equals_diffusers_decode(vae):
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = vae.decode(z)
    with torch.no_grad():
        ref = vae.vae.decode(z.transpose(1, 2) / vae.inv_std + vae.mean).sample.transpose(1, 2)
    assert ours.shape == (1, 1 + 3 * 4, 3, 32, 32)
    assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("split", [(1, 2, 3), (3, 1, 2), (2, 4)])
def test_chunked_decode_equals_full_decode(vae, split):
    z = torch.randn(2, 6, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    full = vae.decode(z)
    state, outs, s = vae.init_state(2), [], 0
    for n in split:
        frames, state = vae.decode_chunk(z[:, s:s + n], state)
        assert frames.shape[1] == (1 + 4 * (n - 1) if s == 0 else 4 * n)
        outs.append(frames)
        s += n
    err = (torch.cat(outs, 1) - full).abs().max().item()
    assert err <= 1e-6, err


def test_old_state_is_not_mutated(vae):
    z = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    _, s1 = vae.decode_chunk(z[:, :1], vae.init_state(1))
    a, _ = vae.decode_chunk(z[:, 1:2], s1)
    b, _ = vae.decode_chunk(z[:, 1:2], s1)                                # same state twice
    assert torch.equal(a, b)
    c, _ = vae.decode_chunk(z[:, 2:3], vae.init_state(1))                 # a fresh stream differs
    assert not torch.allclose(a, c)


def test_bad_configs_raise():
    with pytest.raises(ConfigError, match="latents_mean"):
        WanVAE(config={k: v for k, v in TINY_VAE.items() if not k.startswith("latents")})
    with pytest.raises(ConfigError, match="needs a local"):
        build_vae("wan", 16, 8, 4)
    with pytest.raises(ConfigError, match="cannot load"):
        WanVAE(path="/nonexistent/vae-dir")
