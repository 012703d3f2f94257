"""The engine through the Triton kernels (interpreter on CPU) equals the SDPA path.

Tiny WanDiT, streamed chunk by chunk through a StreamCache whose ring wraps (sink + a
window smaller than the stream), for keys cached with RoPE ("absolute") and without it,
rotated inside the kernel ("relative"); plus a block-causal full forward and backward.
"""
import pytest
import torch

from streamgen.models.attention import FrameMask, attention_backend, frame_mask, resolve_backend, stream_backend
from streamgen.engine.cache import StreamCache
from streamgen.config import CacheConfig, ModelConfig, SamplerConfig
from streamgen.models.model import WanDiT
from streamgen.engine.sampling import FewStepSampler
from streamgen.engine.chunk_step import rollout

pytestmark = pytest.mark.skipif(resolve_backend("triton", "cpu") != "triton" and not torch.cuda.is_available(),
                                reason="triton cannot run here (no GPU and no TRITON_INTERPRET=1)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK, FRAMES, H, W = 2, 12, 4, 6          # 6 tokens per frame, 6 chunks


def _model():
    torch.manual_seed(0)
    return WanDiT(ModelConfig.from_name("tiny")).to(DEV).eval()


def _rollout(model, cache_cfg, backend):
    model.attn_backend = backend
    cfg = model.cfg
    cache = StreamCache(cfg, cache_cfg, batch=2, tokens_per_frame=(H // 2) * (W // 2),
                        chunk_frames=CHUNK, device=DEV)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g).to(DEV)
    cache.cross_kv = model.cross_kv(text)
    noise = torch.randn(2, FRAMES, cfg.in_channels, H, W, generator=g).to(DEV)
    sampler = FewStepSampler(SamplerConfig(denoising_steps=(1000, 500), chunk_frames=CHUNK))
    draw = lambda: torch.randn(noise[:, :CHUNK].shape, generator=g).to(DEV)  # noqa: E731
    with torch.no_grad():
        out = rollout(model, cache, sampler, noise, draw)
    return out, cache


def _spy(fn, log, name):
    def wrapped(*a, **k):
        log.append(name)
        return fn(*a, **k)
    return wrapped


@pytest.mark.parametrize("rope", ["absolute", "relative"])
def test_streaming_triton_equals_sdpa(rope, monkeypatch):
    model = _model()
    cache_cfg = CacheConfig(sink_frames=1, window_frames=4, rope=rope)
    ref, cache = _rollout(model, cache_cfg, "sdpa")
    assert cache.next_frame[0] - cache.S > cache.W          # the ring wrapped
    ran = []                                                       # the kernels that really ran
    import streamgen.kernels.block_causal as bc
    import streamgen.kernels.stream_attention as sa
    monkeypatch.setattr(sa, "stream_attention", _spy(sa.stream_attention, ran, "stream"))
    monkeypatch.setattr(bc, "block_causal_attention", _spy(bc.block_causal_attention, ran, "block_causal"))
    out, _ = _rollout(model, cache_cfg, "triton")
    report = model.attention_backends()
    assert report["self_stream"] == "triton" and report["cross"] == "triton"
    assert ran.count("stream") == ran.count("block_causal") > 0   # every layer: stream self + full cross
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_block_causal_forward_backward_triton_equals_sdpa():
    model = _model().train()
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 5, cfg.in_channels, H, W, generator=g).to(DEV)
    t = torch.rand(1, 5, generator=g).to(DEV) * 1000
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(DEV)
    kw = dict(attn_mode="block_causal", chunk_frames=2, sink_frames=1, window_frames=2)
    res = {}
    for backend in ("sdpa", "triton"):
        model.attn_backend = backend
        model.zero_grad()
        y = model(x, t, text, **kw)
        y.square().mean().backward()
        res[backend] = (y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert model.attention_backends(grad=True)["self_block_causal"] == backend
    torch.testing.assert_close(res["triton"][0], res["sdpa"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(res["triton"][1], res["sdpa"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_frame_mask_structured_equals_dense():
    m = frame_mask(7, 3, mode="block_causal", chunk_frames=2, sink_frames=1, window_frames=3)
    d = frame_mask(7, 3, mode="block_causal", chunk_frames=2, sink_frames=1, window_frames=3, form="dense")
    assert isinstance(m, FrameMask) and d.shape == (21, 21) and m.shape == d.shape
    assert torch.equal(m.dense(), d) and torch.equal(~m, ~d) and m.sum().item() == d.sum().item()
    assert m.visible_pairs() == int(d.sum())
    # frame 5 (chunk 2, end 6, window 3) sees sink frame 0 and frames 3..5 only
    assert d[5 * 3].view(7, 3).any(1).tolist() == [True, False, False, True, True, True, False]


def test_bench_quick_smoke(capsys):
    """``python -m streamgen.kernels.bench --quick --json`` runs and prints one JSON document."""
    import json

    from streamgen.kernels import bench
    bench.main(["--quick", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert {"command", "machine", "device", "figures"} <= set(doc)
    rows = {(r["kernel"], r["backend"], r.get("phase")): r for r in doc["figures"]}
    for key in [("stream", "triton", None), ("stream", "triton+k_rope", None), ("stream", "sdpa", None),
                ("block_causal", "triton", "fwd"), ("block_causal", "triton", "fwd+bwd")]:
        assert "error" not in rows[key] and rows[key]["ms"] > 0, rows[key]
    assert rows[("stream", "triton", None)]["max_abs_diff_vs_first"] == 0.0
    assert rows[("stream", "sdpa", None)]["max_abs_diff_vs_first"] < 1e-2


@pytest.mark.parametrize("backend", ["sdpa", "math", "triton", "flex", "xformers", "flash"])
def test_every_backend_string_runs_and_reports(backend):
    """Each BACKENDS string works for dense, structured and cache calls; the reports are honest."""
    from streamgen.models.attention import BACKENDS, attention, math_attention, stream_attention
    assert backend in BACKENDS
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 12, 2, 16, generator=g).to(DEV) for _ in range(3))
    m = frame_mask(4, 3, mode="block_causal", chunk_frames=2, sink_frames=1, window_frames=2)
    ran = resolve_backend(backend, DEV)
    out = attention(q, k, v, m, backend=backend)
    assert attention_backend(q, k, v, m, backend) in (ran, "sdpa")
    torch.testing.assert_close(out, math_attention(q, k, v, m.dense(DEV)), atol=1e-5, rtol=1e-5)
    valid = torch.rand(2, 12, generator=g).to(DEV) > 0.3
    out = stream_attention(q[:, :5], k, v, valid, backend=backend)
    assert stream_backend(q[:, :5], k, v, valid, backend) in (ran, "sdpa")
    torch.testing.assert_close(out, math_attention(q[:, :5], k, v, valid[:, None, None, :]), atol=1e-5, rtol=1e-5)


def test_fused_norms_run_in_the_triton_stream_and_match(monkeypatch):
    """backend "triton": the model's q/k RMSNorm+RoPE and LayerNorm+modulate run the fused kernels
    (inference only; a recording forward keeps PyTorch) and the stream equals the SDPA one."""
    import streamgen.kernels.fused_norm as fn
    model = _model()
    cache_cfg = CacheConfig(sink_frames=1, window_frames=4, rope="absolute")
    ref, _ = _rollout(model, cache_cfg, "sdpa")
    ran = []
    monkeypatch.setattr(fn, "rmsnorm_rope", _spy(fn.rmsnorm_rope, ran, "rmsnorm_rope"))
    monkeypatch.setattr(fn, "layernorm_modulate", _spy(fn.layernorm_modulate, ran, "layernorm_modulate"))
    out, _ = _rollout(model, cache_cfg, "triton")
    calls = FRAMES // CHUNK * 3 * model.cfg.num_layers                 # (2 steps + context pass) per chunk
    assert ran.count("rmsnorm_rope") == 2 * calls and ran.count("layernorm_modulate") == 2 * calls
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ran.clear()
    model.train()
    cfg = model.cfg
    x = torch.randn(1, 4, cfg.in_channels, H, W).to(DEV)
    model(x, torch.full((1, 4), 500.0, device=DEV), torch.randn(1, cfg.text_len, cfg.text_dim).to(DEV),
          attn_mode="block_causal", chunk_frames=CHUNK).sum().backward()
    assert ran == []                                                   # no autograd through them
