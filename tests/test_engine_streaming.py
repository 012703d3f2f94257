"""The streaming path is the same math as the full forward, and the ring equals a naive cache."""
import dataclasses

import pytest
import torch

from naive_cache import NaiveCache
from streamgen.engine.cache import StreamCache
from streamgen.config import CacheConfig, ModelConfig
from streamgen.models.model import WanDiT

H = W = 8  # latent size -> 16 tokens per frame with patch (1, 2, 2)


def make_model(seed=0, preset="tiny"):
    torch.manual_seed(seed)
    m = WanDiT(ModelConfig.from_name(preset)).eval()
    # make every parameter matter (Wan inits some to zero-ish scales)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def inputs(cfg, frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, cfg.in_channels, H, W, generator=g)
    t = torch.rand(1, frames, generator=g) * 1000
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, text


def stream(model, cache, x, t, k):
    outs = []
    for s in range(0, x.shape[1], k):
        cache.begin_chunk(k)
        outs.append(model(x[:, s:s + k], t[:, s:s + k], cache=cache))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("window,sink", [(-1, 0), (6, 3), (3, 0), (6, 0)])
def test_streaming_equals_block_causal_forward(chunk, window, sink):
    model = make_model()
    cfg = model.cfg
    frames = 12
    if window != -1 and window < chunk:
        pytest.skip("window smaller than chunk")
    cc = CacheConfig(sink_frames=sink, window_frames=window, max_frames=frames)
    x, t, text = inputs(cfg, frames)
    cache = StreamCache(cfg, cc, 1, 16, chunk)
    with torch.no_grad():
        cache.cross_kv = model.cross_kv(text)
        got = stream(model, cache, x, t, chunk)
        ref = model(x, t, text, attn_mode="block_causal", chunk_frames=chunk,
                    sink_frames=sink, window_frames=window)
    err = (got - ref).abs().max().item()
    assert err <= 1e-5, err
    if window != -1:  # eviction really happened: a global forward differs
        glob = model(x, t, text, attn_mode="block_causal", chunk_frames=chunk)
        assert (glob - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("rope", ["absolute", "relative"])
@pytest.mark.parametrize("sink_kind,sink", [("frame", 3), ("none", 0), ("ema", 3)])
def test_ring_equals_naive_cache_after_ten_windows(rope, sink_kind, sink):
    if sink_kind == "ema" and rope == "absolute":
        pytest.skip("EMA sink requires relative RoPE (config rejects it)")
    model = make_model(1)
    cfg = dataclasses.replace(model.cfg, rope_max_pos=1024)
    k, win = 3, 6
    cc = CacheConfig(sink=sink_kind, sink_frames=sink, window_frames=win, rope=rope, ema_alpha=0.9)
    frames = sink + 10 * win + k
    x, t, text = inputs(cfg, frames, seed=2)
    ring = StreamCache(cfg, cc, 1, 16, k)
    naive = NaiveCache(cc, cfg.num_layers, 16)
    ptr, nbytes = ring.k.data_ptr(), ring.memory_bytes()
    with torch.no_grad():
        ring.cross_kv = naive.cross_kv = model.cross_kv(text)
        a = stream(model, ring, x, t, k)
        b = stream(model, naive, x, t, k)
    assert (a - b).abs().max().item() <= 1e-5
    assert ring.k.data_ptr() == ptr and ring.memory_bytes() == nbytes  # no regrowth, in place
    if rope == "relative":
        assert int(ring.q_pos.max()) < sink + win  # bounded positions forever


def test_relative_equals_absolute_until_window_fills():
    model = make_model(2)
    cfg = model.cfg
    x, t, text = inputs(cfg, 9, seed=3)
    out = {}
    for rope in ("absolute", "relative"):
        cache = StreamCache(cfg, CacheConfig(sink_frames=3, window_frames=6, rope=rope), 1, 16, 3)
        with torch.no_grad():
            cache.cross_kv = model.cross_kv(text)
            out[rope] = stream(model, cache, x, t, 3)
    # frames 0..8: positions coincide (window not yet rolled past the sink)
    assert (out["absolute"] - out["relative"]).abs().max().item() <= 1e-5


def test_absolute_rope_cap_is_a_clear_error():
    model = make_model()
    cfg = dataclasses.replace(model.cfg, rope_max_pos=6)
    cache = StreamCache(cfg, CacheConfig(sink_frames=0, window_frames=3), 1, 16, 3)
    cache.begin_chunk(3)
    cache.begin_chunk(3)
    with pytest.raises(Exception, match="relative"):
        cache.begin_chunk(3)


def test_ema_sink_blends_evicted_frames():
    """After eviction the sink holds a*sink + (1-a)*evicted, computed by hand."""
    cfg = ModelConfig.from_name("tiny")
    cc = CacheConfig(sink="ema", sink_frames=1, window_frames=1, rope="relative", ema_alpha=0.75)
    cache = StreamCache(cfg, cc, 1, 2, 1)
    vals = []
    for f in range(3):
        cache.begin_chunk(1)
        kv = torch.full((1, 2, cfg.num_heads, cfg.head_dim), float(f + 1))
        cache.write(0, kv, kv)
        vals.append(f + 1)
    # frame 0 -> sink (1.0); frame 1 -> ring; frame 2 evicts frame 1: sink = .75*1 + .25*2
    sink = cache.k[0, 0, :2]
    assert torch.allclose(sink, torch.full_like(sink, 0.75 * 1 + 0.25 * 2))
    ring = cache.k[0, 0, 2:4]
    assert torch.allclose(ring, torch.full_like(ring, 3.0))


def test_row_views_stream_like_their_own_cache():
    """A rows(a, b) view of a shared cache streams row by row exactly like a private cache,
    writes land in the shared buffers, and other rows are untouched."""
    model = make_model()
    cfg = model.cfg
    cc = CacheConfig(sink_frames=3, window_frames=6, rope="relative")
    x, t, text = inputs(cfg, 12)
    shared = StreamCache(cfg, cc, 3, 16, 3)
    own = StreamCache(cfg, cc, 1, 16, 3)
    with torch.no_grad():
        own.cross_kv = model.cross_kv(text)
        ref = stream(model, own, x, t, 3)
        before = shared.k[:, [0, 2]].clone()
        outs = []
        for s in range(0, 12, 3):
            view = shared.rows(1, 2)
            view.cross_kv = own.cross_kv
            view.begin_chunk(3)
            outs.append(model(x[:, s:s + 3], t[:, s:s + 3], cache=view))
            shared.merge_rows(view, 1)
    assert (torch.cat(outs, 1) - ref).abs().max().item() <= 1e-6
    assert torch.equal(shared.k[:, 1], own.k[:, 0]) and torch.equal(shared.k[:, [0, 2]], before)
    assert shared.next_frame == [0, 12, 0] and shared.cached_frames(1) == own.cached_frames(0)
    with pytest.raises(ValueError):
        shared.rows(2, 4)


def test_learned_position_embedding_streams_like_the_full_forward():
    """pos_embed="learned" (small models): same streaming == block-causal guarantee, and the
    embedding really makes the output depend on where a patch sits in the frame."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), pos_embed="learned", pos_grid=8)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cc = CacheConfig(sink_frames=3, window_frames=6, max_frames=12)      # absolute RoPE, with eviction
    x, t, text = inputs(cfg, 12)
    cache = StreamCache(cfg, cc, 1, 16, 3)
    with torch.no_grad():
        cache.cross_kv = model.cross_kv(text)
        got = stream(model, cache, x, t, 3)
        ref = model(x, t, text, attn_mode="block_causal", chunk_frames=3, sink_frames=3, window_frames=6)
        assert (got - ref).abs().max().item() <= 1e-5
        flat = torch.ones_like(x)                       # the same patch everywhere
        out = model(flat, t, text)
        assert (out[..., :2, :2] - out[..., -2:, -2:]).abs().max() > 1e-4
    assert "pos_embedding_h" in model.state_dict()
    with pytest.raises(Exception, match="pos_grid"):
        model(torch.zeros(1, 3, cfg.in_channels, 40, 40), t[:, :3], text)


def test_block_action_pathway_streams_like_the_full_forward_and_grows_from_time_models():
    """action_inject="time+blocks": streaming == block-causal with actions, the keys change the
    output through the block MLPs alone, and a "time" checkpoint loads into it only when the
    new MLPs are named fresh (they start at zero, so the grown model equals the old one)."""
    from streamgen.io.checkpoint import CheckpointError, check_and_load
    from streamgen.config import ActionSpace, ConfigError
    base = dataclasses.replace(ModelConfig.from_name("tiny"), actions=ActionSpace(keys=("W", "A"), mouse=True))
    with pytest.raises(ConfigError, match="action_inject"):
        dataclasses.replace(base, action_inject="cross")
    torch.manual_seed(0)
    old = WanDiT(base).eval()
    cfg = dataclasses.replace(base, action_inject="time+blocks")
    grown = WanDiT(cfg).eval()
    with pytest.raises(CheckpointError, match="missing"):
        check_and_load(grown, old.state_dict())
    check_and_load(grown, old.state_dict(), fresh=("action_mlp", "action_features"))
    x, t, text = inputs(cfg, 6)
    act = torch.randn(1, 6, cfg.actions.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(grown(x, t, text, action=act), old(x, t, text, action=act))
        for p in grown.parameters():
            p.add_(0.02 * torch.randn_like(p))
        grown.action_embedding[2].weight.zero_()          # keys reach the output only via blocks
        grown.action_embedding[2].bias.zero_()
        other = grown(x, t, text, action=-act)
        ref = grown(x, t, text, action=act, attn_mode="block_causal", chunk_frames=3, sink_frames=3,
                    window_frames=6)
        assert (other - grown(x, t, text, action=act)).abs().max() > 1e-4
        cache = StreamCache(cfg, CacheConfig(sink_frames=3, window_frames=6, max_frames=12), 1, 16, 3)
        cache.cross_kv = grown.cross_kv(text)
        outs = []
        for s in range(0, 6, 3):
            cache.begin_chunk(3)
            outs.append(grown(x[:, s:s + 3], t[:, s:s + 3], cache=cache, action=act[:, s:s + 3]))
        assert (torch.cat(outs, 1) - ref).abs().max().item() <= 1e-5
