"""frame_cond="last": every chunk sees the previous chunk's last clean frame. Streaming through
the cache (which keeps that frame) equals the full block-causal forward given
``previous_chunk_last``; the training rollout and the inference loop agree; bad use is a clear error."""
import dataclasses

import numpy as np
import pytest
import torch

from streamgen import Pipeline
from streamgen.config import CacheConfig, ModelConfig, PipelineConfig
from streamgen.engine import chunk_step
from streamgen.engine.cache import StreamCache
from streamgen.engine.sampling import FewStepSampler
from streamgen.errors import ConfigError
from streamgen.io.convert import infer_model_config
from streamgen.models.model import WanDiT, previous_chunk_last
from streamgen.training.losses import frame_cond_input
from streamgen.training.rollout import new_cache, rollout

H = W = 8


def fc_model(seed=0, mode="last"):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), frame_cond=mode)
    m = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():                   # the frame embedding starts at zero: make it matter
            p.add_(0.02 * torch.randn_like(p))
    return m


def test_previous_chunk_last():
    x = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 2, 2, 2)
    got = previous_chunk_last(x, 2)[0, :, 0, 0, 0].tolist()
    assert got == [0, 0, 1, 1, 3, 3]


@pytest.mark.parametrize("mode", ["last", "residual"])
@pytest.mark.parametrize("window,sink", [(-1, 0), (6, 3)])
def test_streaming_equals_block_causal_forward(window, sink, mode):
    m = fc_model(mode=mode)
    cfg, k, frames = m.cfg, 3, 12
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, frames, cfg.in_channels, H, W, generator=g)       # the clean latents
    t = torch.rand(1, frames, generator=g) * 1000
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    cache = StreamCache(cfg, CacheConfig(sink_frames=sink, window_frames=window, max_frames=frames), 1, 16, k,
                        latent_hw=(H, W))
    outs = []
    with torch.no_grad():
        cache.cross_kv = m.cross_kv(text)
        for s in range(0, frames, k):
            cache.begin_chunk(k)
            outs.append(m(x[:, s:s + k], t[:, s:s + k], cache=cache))
            cache.end_chunk(x[:, s:s + k])
        ref = m(x, t, text, attn_mode="block_causal", chunk_frames=k, sink_frames=sink, window_frames=window,
                frame_cond=previous_chunk_last(x, k))
        plain = m(x, t, text, attn_mode="block_causal", chunk_frames=k, sink_frames=sink, window_frames=window,
                  frame_cond=torch.zeros_like(x))
    got = torch.cat(outs, 1)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (plain - ref)[:, k:].abs().max().item() > 1e-3          # the frame really changes the output
    assert (plain - ref)[:, :k].abs().max().item() == 0            # chunk 0 sees zeros


def test_residual_is_last_minus_the_frame():
    """frame_cond="residual" = the "last" network's flow minus the frame: x0 = x_t - sigma (v - a)
    leans toward the last frame by sigma; at t = 0 the input passes through unchanged."""
    last, res = fc_model(mode="last"), fc_model(mode="residual")
    res.load_state_dict(last.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, last.cfg.in_channels, H, W, generator=g)
    t = torch.rand(1, 6, generator=g) * 1000
    text = torch.randn(1, last.cfg.text_len, last.cfg.text_dim, generator=g)
    a = previous_chunk_last(torch.randn_like(x), 3)
    kw = dict(attn_mode="block_causal", chunk_frames=3, frame_cond=a)
    with torch.no_grad():
        assert torch.allclose(res(x, t, text, **kw), last(x, t, text, **kw) - a, atol=1e-6)
    assert res.cfg.num_params() == last.cfg.num_params() == sum(p.numel() for p in res.parameters())


def test_full_forward_needs_frame_cond_and_cache_needs_size():
    m = fc_model()
    x, t = torch.randn(1, 3, 4, H, W), torch.full((1, 3), 500.0)
    text = torch.randn(1, m.cfg.text_len, m.cfg.text_dim)
    with pytest.raises(ConfigError, match="frame_cond"):
        m(x, t, text)
    with pytest.raises(ConfigError, match="shape"):
        m(x, t, text, frame_cond=torch.zeros(1, 2, 4, H, W))
    with pytest.raises(ConfigError, match="latent_hw"):
        StreamCache(m.cfg, CacheConfig(), 1, 16, 3)
    with pytest.raises(ConfigError, match="frame_cond"):
        ModelConfig.from_name("tiny").__class__(**{**dataclasses.asdict(m.cfg), "frame_cond": "two"})


def test_cache_last_frame_rows_reset_and_in_place():
    m = fc_model()
    c = StreamCache(m.cfg, CacheConfig(), 3, 16, 3, latent_hw=(H, W))
    ptr = c.last_frame.data_ptr()
    c.end_chunk(torch.ones(3, 3, 4, H, W))
    v = c.rows(1, 2)
    v.end_chunk(torch.full((1, 3, 4, H, W), 5.0))                 # a row view writes through
    assert c.last_frame.data_ptr() == ptr
    assert c.last_frame[:, 0, 0, 0].tolist() == [1, 5, 1]
    c.reset([0])
    assert c.last_frame[:, 0, 0, 0].tolist() == [0, 5, 1]


def test_infer_config_and_plain_model_unchanged():
    m = fc_model()
    assert infer_model_config(m.state_dict(), head_dim=m.cfg.head_dim)["frame_cond"] == "last"
    plain = WanDiT(ModelConfig.from_name("tiny"))
    assert not hasattr(plain, "frame_cond_embedding")
    n = sum(p.numel() for p in m.parameters())
    assert n == m.cfg.num_params()


def _tiny_world_fc():
    p = PipelineConfig.from_name("tiny-world")
    return dataclasses.replace(p, model=dataclasses.replace(p.model, frame_cond="last"))


def test_training_rollout_equals_inference_and_backprops():
    p = _tiny_world_fc()
    torch.manual_seed(0)
    m = WanDiT(p.model)
    with torch.no_grad():
        m.frame_cond_embedding.weight.normal_(0, 0.05)
    noise, text, act = torch.randn(2, 9, 4, 8, 8), torch.randn(2, 16, 32), torch.randn(2, 9, 6)
    s = FewStepSampler(p.sampler)
    g = torch.Generator().manual_seed(1)
    c = new_cache(p, 2)
    c.cross_kv = m.cross_kv(text)
    with torch.no_grad():
        ref = chunk_step.rollout(m, c, s, noise, lambda: torch.randn(2, 3, 4, 8, 8, generator=g), act)
    g = torch.Generator().manual_seed(1)
    c = new_cache(p, 2)
    c.cross_kv = m.cross_kv(text)
    out = rollout(m, c, s.timesteps, noise, lambda sh: torch.randn(*sh, generator=g), 3, act)
    assert torch.allclose(out.detach(), ref, atol=1e-6)
    out.square().mean().backward()                                # no in-place autograd error
    assert m.frame_cond_embedding.weight.grad.abs().sum() > 0


def test_frame_cond_input_noise_only_where_a_frame_is():
    x0 = torch.randn(2, 6, 4, 2, 2)
    eps = torch.randn_like(x0)
    clean = frame_cond_input(x0, 3, 0.0, eps)
    assert torch.equal(clean, previous_chunk_last(x0, 3))
    noisy = frame_cond_input(x0, 3, 0.5, eps, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, :3], torch.zeros_like(noisy[:, :3]))      # chunk 0: still zeros
    d = (noisy - clean)[:, 3:]
    assert d.abs().max() > 0 and d.abs().max() <= 0.5 * eps.abs().max()


def test_session_start_and_recache_carry_the_frame():
    cfg = _tiny_world_fc()
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, prompt_switch="recache"))
    pipe = Pipeline.from_pretrained("tiny-world", random_weights=True, config=cfg)
    assert pipe.config.model.frame_cond == "last"
    with torch.no_grad():
        pipe.model.frame_cond_embedding.weight.normal_(0, 0.05)
    frames = np.random.default_rng(0).integers(0, 255, (3, cfg.height, cfg.width, 3), dtype=np.uint8)
    s = pipe.session("a brick dungeon", seed=0, start=frames)
    assert s.cache.last_frame.abs().sum() > 0                     # the opening chunk's last frame
    s.step({"keys": ["W"]})
    s.set_prompt("an ice cave")
    out = s.step({"keys": ["A"]})
    assert out.shape[0] == cfg.sampler.chunk_frames


def test_server_rows_keep_their_own_frame_when_another_client_leaves():
    """A frame_cond model in the batcher: the first client leaves after one chunk (the last row
    moves into its row, frame included); the others still give their solo sessions' frames."""
    import time
    pytest.importorskip("fastapi")
    from streamgen.server.batcher import Batcher
    pipe = Pipeline.from_pretrained("tiny-world", random_weights=True, config=_tiny_world_fc())
    with torch.no_grad():
        pipe.model.frame_cond_embedding.weight.normal_(0, 1.0)        # make the frame matter a lot
    b = Batcher(pipe, max_sessions=3, pace=0, admission="degrade", calibrate=False)
    specs = [("a red room", 3), ("a blue hall", 4), ("green", 5)]
    got = {i: [] for i in range(3)}
    b.start()
    try:
        slots = [b.open(p, s, got[i].append, lambda r, m: None, start="world") for i, (p, s) in enumerate(specs)]
        for sl in slots:
            b.set_action(sl, {"keys": ["W"]}, None)
        t_end = time.monotonic() + 120
        while not got[0] and time.monotonic() < t_end:
            time.sleep(0.005)
        b.close(slots[0])
        while min(len(got[1]), len(got[2])) < 3 and time.monotonic() < t_end:
            time.sleep(0.01)
    finally:
        b.stop()
    for i in (1, 2):
        s = pipe.session(specs[i][0], seed=specs[i][1], start="world")
        for j in range(3):
            ref = s.step({"keys": ["W"]})
            diff = np.abs(got[i][j].frames.astype(int) - ref.astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.05, f"session {i} chunk {j}: max {diff.max()}"
