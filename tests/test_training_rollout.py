"""The self-forcing rollout is the inference loop; gradient flows only through exit steps."""
import pytest
import torch

from streamgen.engine import chunk_step
from streamgen.codecs.autoencoder import TinyAutoencoder
from streamgen.config import PipelineConfig
from streamgen.models.model import WanDiT
from streamgen.engine.sampling import FewStepSampler
from streamgen.training.rollout import new_cache, rollout


def _setup():
    torch.manual_seed(0)
    p = PipelineConfig.from_name("tiny-world")
    m = WanDiT(p.model)
    B, F = 2, 9
    return p, m, torch.randn(B, F, 4, 8, 8), torch.randn(B, 16, 32), torch.randn(B, F, 6)


def test_rollout_at_last_exit_equals_inference():
    p, m, noise, text, act = _setup()
    s = FewStepSampler(p.sampler)
    g = torch.Generator().manual_seed(1)
    c = new_cache(p, 2)
    c.cross_kv = m.cross_kv(text)
    ref = chunk_step.rollout(m, c, s, noise, lambda: torch.randn(2, 3, 4, 8, 8, generator=g), act)
    g = torch.Generator().manual_seed(1)
    c = new_cache(p, 2)
    c.cross_kv = m.cross_kv(text)
    out = rollout(m, c, s.timesteps, noise, lambda sh: torch.randn(*sh, generator=g), 3, act)
    assert torch.equal(out.detach(), ref)


def test_rollout_gradient_through_exit_step_only():
    p, m, noise, text, act = _setup()
    s = FewStepSampler(p.sampler)
    for exit_step in (0, 2):
        m.zero_grad()
        c = new_cache(p, 2)
        c.cross_kv = m.cross_kv(text)
        out = rollout(m, c, s.timesteps, noise, lambda sh: torch.randn(*sh), exit_step, act)
        assert out.requires_grad and not c.k.requires_grad          # the cache buffers stay detached
        out.square().mean().backward()                              # no in-place autograd error
        assert m.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


def test_rollout_context_modes_run():
    p, m, noise, text, act = _setup()
    s = FewStepSampler(p.sampler)
    gt = torch.randn_like(noise)
    outs = {}
    for mode in ("self", "clean", "noisy"):
        torch.manual_seed(3)
        c = new_cache(p, 2)
        c.cross_kv = m.cross_kv(text)
        outs[mode] = rollout(m, c, s.timesteps, noise, lambda sh: torch.randn(*sh), 1, act, context=mode, gt=gt,
                             context_t=torch.full((2, 3), 500.0), grad=False)
    assert not torch.equal(outs["self"], outs["clean"])
    # the first chunk never sees any context: identical in every mode
    assert torch.allclose(outs["self"][:, :3], outs["clean"][:, :3])


@pytest.mark.parametrize("stride,channels", [(8, 8), (4, 4)])
def test_autoencoder_streaming_decode_equals_full(stride, channels):
    torch.manual_seed(0)
    ae = TinyAutoencoder(channels, width=8, stride=stride).eval()
    video = torch.rand(1, 7, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode(video)
        assert z.shape == (1, 7, channels, 64 // stride, 64 // stride)
        full = ae.decode(z)
        st, parts = ae.init_state(1), []
        for s in (0, 3, 6):
            f, st = ae.decode_chunk(z[:, s:s + 3], st)
            parts.append(f)
    assert full.shape == (1, 7, 3, 64, 64)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-6)
    ae2 = TinyAutoencoder.from_state(ae.state_dict(), latent_channels=channels)   # stride read from the weights
    assert ae2.spatial_stride == stride
    assert torch.equal(ae2.state_dict()["decoder.0.weight"], ae.state_dict()["decoder.0.weight"])


def test_tiny_ae_stride_is_checked_against_the_pipeline():
    from streamgen.codecs.factory import build_vae
    from streamgen.errors import ConfigError
    sd = TinyAutoencoder(4, width=8, stride=4).state_dict()
    assert build_vae("tiny-ae", 4, 4, 1, state_dict=sd).spatial_stride == 4
    with pytest.raises(ConfigError, match="stride"):
        build_vae("tiny-ae", 4, 8, 1, state_dict=sd)                 # a stride-8 pipeline, stride-4 weights
    with pytest.raises(ConfigError, match="stride"):
        TinyAutoencoder(4, stride=2)
