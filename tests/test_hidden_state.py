"""No hidden state: nothing at module level is written while the engine runs, reports of which
attention backend ran are decided per call (and true), the random-init autoencoder leaves the
caller's RNG alone, the cache's functional write is explicit, compile replaces nothing of the
model, presets are a read-only table, masks live in a leaf module."""
import subprocess
import sys
import types

import pytest
import torch

import streamgen.models.attention as A
from streamgen.engine import compile as C
from streamgen.codecs.autoencoder import TinyAutoencoder
from streamgen.engine.cache import StreamCache
from streamgen.config import PIPELINE_PRESETS, PipelineConfig
from streamgen.models.model import WanDiT
from streamgen.engine.sampling import FewStepSampler
from streamgen.engine.chunk_step import chunk_step, generate_chunk, rollout

ENGINE = ("streamgen.models.attention", "streamgen.models.masks", "streamgen.engine.cache", "streamgen.engine.sampling",
          "streamgen.engine.chunk_step", "streamgen.models.model", "streamgen.models.rope", "streamgen.config",
          "streamgen.config.presets", "streamgen.io.families", "streamgen.engine.compile", "streamgen.codecs.autoencoder",
          "streamgen.models.kernels_bridge", "streamgen.io.checkpoint", "streamgen.codecs.vae", "streamgen.engine.pipeline",
          "streamgen.codecs.base", "streamgen.codecs.preview", "streamgen.codecs.factory", "streamgen.engine.fp8",
          "streamgen.engine.overlapped_decode", "streamgen.world.render", "streamgen.world.scene",
          "streamgen.world.episodes", "streamgen.world.policies", "streamgen.world.data")


def _tiny(backend="sdpa"):
    torch.manual_seed(0)
    p = PipelineConfig.from_name("tiny-world")
    m = WanDiT(p.model).eval()
    m.attn_backend = backend
    return p, m


def _stream(p, m, chunks=2, step=chunk_step):
    g = torch.Generator().manual_seed(1)
    cache = StreamCache(p.model, p.cache, 1, p.tokens_per_frame, p.sampler.chunk_frames)
    with torch.no_grad():                                  # as Pipeline.encode_prompt
        cache.cross_kv = m.cross_kv(torch.randn(1, p.model.text_len, p.model.text_dim, generator=g))
    k = p.sampler.chunk_frames
    shape = (1, k, p.model.in_channels, p.latent_height, p.latent_width)
    noise = torch.randn((1, chunks * k) + shape[2:], generator=g)
    act = torch.zeros(1, chunks * k, p.model.actions.dim)
    with torch.no_grad():
        return rollout(m, cache, FewStepSampler(p.sampler), noise, lambda s: torch.randn(s, generator=g), act,
                       step=step)


def _module_state():
    """Every module-level container of the engine modules: (module, name) -> a deep snapshot."""
    import importlib

    def snap(v):
        if isinstance(v, (dict, types.MappingProxyType)):
            return {k: snap(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, set, frozenset)):
            return type(v)(snap(x) for x in v) if not isinstance(v, set) else frozenset(map(repr, v))
        if isinstance(v, torch.Tensor):
            return ("tensor", v.data_ptr(), tuple(v.shape), v.clone())
        return v if isinstance(v, (int, float, str, bytes, bool, type(None))) else ("obj", id(v))
    out = {}
    for name in ENGINE:
        mod = importlib.import_module(name)
        for k, v in vars(mod).items():
            if isinstance(v, (dict, list, set, types.MappingProxyType, torch.Tensor)) and not k.startswith("__"):
                out[(name, k)] = snap(v)
    return out


def _same(a, b):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return isinstance(b, tuple) and a[:3] == b[:3] and torch.equal(a[3], b[3])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_engine_writes_no_module_level_state():
    from streamgen.engine.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("tiny-world", random_weights=True)     # imports and caches done
    pipe.session("warm up", seed=0).step()
    before = _module_state()
    s = pipe.session("a brick dungeon", seed=3)
    s.step({"keys": ["W"]})
    s.set_prompt("an ice cave")                                            # re-cache policy
    s.step()
    from streamgen.world.episodes import generate_clip
    for seed, size in ((11, 48), (12, 40)):                                # looks and sizes not seen yet
        generate_clip(seed, 6, size=size, policy="explore" if seed == 11 else "random")
    p, m = _tiny()
    m.train()
    x = torch.randn(1, 6, p.model.in_channels, p.latent_height, p.latent_width)
    text = torch.randn(1, p.model.text_len, p.model.text_dim)
    for backend in ("sdpa", "math", "flex", "triton"):                     # every path the CPU can run
        m.attn_backend = A.resolve_backend(backend)
        m(x, torch.full((1, 6), 500.0), text, attn_mode="block_causal", chunk_frames=3).square().mean().backward()
        m.attention_backends(grad=True)
    after = _module_state()
    assert before.keys() == after.keys()
    changed = [k for k in before if not _same(before[k], after[k])]
    assert not changed, f"module-level state written at run time: {changed}"
    assert not hasattr(A, "_LAST") and not hasattr(A, "last_backend")


class _Spy:
    """Records which implementation each attention call really ran (by patching the runners)."""

    def __init__(self, monkeypatch):
        import streamgen.models.kernels_bridge as KB
        self.ran = []
        for mod, name, label in ((A, "_sdpa", "sdpa"), (A, "math_attention", "math"),
                                 (A, "_flex_attention", "flex"), (KB, "triton_attention", "triton"),
                                 (KB, "triton_stream_attention", "triton")):
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name), label))

    def _wrap(self, fn, label):
        def run(*a, **k):
            self.ran.append(label)
            return fn(*a, **k)
        return run

    def take(self) -> set:
        out, self.ran = set(self.ran), []
        return out


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_backend_report_is_what_runs_per_call_path(backend, monkeypatch):
    """model.attention_backends() names, per call path, the implementation that really runs
    (e.g. "flex" asked for, but a CPU backward runs SDPA; "flash" asked for, streaming runs SDPA)."""
    spy = _Spy(monkeypatch)
    p, m = _tiny(backend)
    # streaming: self-attention through the cache + cross-attention, no grad
    _stream(p, m, chunks=1)
    report = m.attention_backends()
    assert spy.take() == {report["self_stream"], report["cross"]}
    # full block-causal forward with autograd recording (training)
    x = torch.randn(1, 6, p.model.in_channels, p.latent_height, p.latent_width)
    m(x, torch.full((1, 6), 500.0), torch.randn(1, p.model.text_len, p.model.text_dim),
      attn_mode="block_causal", chunk_frames=3).sum().backward()
    report = m.attention_backends(grad=True)
    assert spy.take() == {report["self_block_causal"], report["cross"]}
    if A.resolve_backend("flex") == "flex" and backend == "flex":
        assert report["self_block_causal"] == "sdpa"                   # no FlexAttention backward on CPU
        assert m.attention_backends()["self_block_causal"] == "flex"


def test_tiny_ae_random_init_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    ae = TinyAutoencoder.from_state(None, latent_channels=8)
    assert torch.equal(torch.rand(4), expected)                         # caller's stream untouched
    with torch.random.fork_rng(devices=[]):                             # the weights it always had
        torch.manual_seed(0)
        ref = TinyAutoencoder(8)
    for (k, a), b in zip(ae.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_functional_cache_write_is_explicit():
    p, _ = _tiny()
    cache = StreamCache(p.model, p.cache, 1, p.tokens_per_frame, p.sampler.chunk_frames)
    assert not hasattr(cache, "functional")
    cache.begin_chunk()
    n = p.sampler.chunk_frames * p.tokens_per_frame
    k = torch.ones(1, n, p.model.num_heads, p.model.head_dim)
    view = cache.functional_view()
    k_all, v_all = view.write(0, k, 2 * k)                               # [1, S_tok, H, D] new tensors
    assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0        # shared buffers untouched
    assert k_all.sum() == k.sum() and v_all.sum() == 2 * k.sum()
    assert k_all.data_ptr() != cache.k[0].data_ptr()
    k_in, _ = cache.write(0, k, 2 * k)                                  # the cache itself: in place
    assert k_in.data_ptr() == cache.k[0].data_ptr() and cache.k.sum() == k.sum()


def test_compile_leaves_the_model_alone_and_compiles_the_chunk_step():
    torch._dynamo.reset()
    p, m = _tiny()
    forward = m.forward
    assert C.compile_chunk_step("none") is chunk_step
    ref = _stream(p, m)
    out = _stream(p, m, step=C.compile_chunk_step("default", backend="aot_eager"))
    assert (ref - out).abs().max().item() <= 1e-5
    C.compile_model(m, "default", backend="aot_eager")
    assert "forward" not in vars(m) and m.forward.__func__ is forward.__func__


def test_generate_chunk_draws_noise_by_shape():
    """One noise convention: draw(shape); a zero-argument draw gives the same result."""
    p, m = _tiny()
    outs = []
    for zero_arg in (False, True):
        g = torch.Generator().manual_seed(5)
        cache = StreamCache(p.model, p.cache, 1, p.tokens_per_frame, p.sampler.chunk_frames)
        cache.cross_kv = m.cross_kv(torch.zeros(1, p.model.text_len, p.model.text_dim))
        shape = (1, p.sampler.chunk_frames, p.model.in_channels, p.latent_height, p.latent_width)
        shapes = []

        def draw(s):
            shapes.append(tuple(s))
            return torch.randn(s, generator=g)
        d = (lambda: draw(shape)) if zero_arg else draw
        outs.append(generate_chunk(m, cache, FewStepSampler(p.sampler), torch.randn(shape, generator=g), d))
        assert shapes == [shape] * (len(p.sampler.denoising_steps) - 1)
    assert torch.equal(*outs)


def test_presets_are_a_read_only_table():
    with pytest.raises(TypeError):
        PIPELINE_PRESETS["mine"] = {}                                   # no registering at run time
    with pytest.raises(TypeError):
        PIPELINE_PRESETS["tiny"]["cache"]["sink_frames"] = 9            # nor editing one
    assert "longlive" in PIPELINE_PRESETS and PipelineConfig.from_name("longlive").cache.window_frames == 9
    import streamgen.io.families as fam
    assert not hasattr(fam, "register")
    assert set(fam.FAMILY_PRESETS) <= set(PIPELINE_PRESETS)
    assert fam.FAMILY_PRESETS.keys() == fam.FAMILY_NOTES.keys()


@pytest.mark.parametrize("first", ["streamgen.io.families", "streamgen.config", "streamgen.io.checkpoint"])
def test_presets_do_not_depend_on_import_order(first):
    code = (f"import {first}\nfrom streamgen.config import PIPELINE_PRESETS as P\n"
            "print(sorted(P))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(PIPELINE_PRESETS))


def test_masks_are_a_leaf_and_kernels_import_no_engine():
    code = ("import sys, streamgen.models.masks\n"
            "print(sorted(m for m in sys.modules if m.startswith('streamgen')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(eval(out.stdout))
    assert loaded <= {"streamgen", "streamgen.config", "streamgen.errors", "streamgen.config.presets", "streamgen.models",
                      "streamgen.models.masks"}
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
    for f in ("block_causal.py", "stream_attention.py", "_common.py"):
        imports = [ln for ln in (root / f).read_text().splitlines() if ln.startswith(("from streamgen", "import streamgen"))]
        assert all(ln.startswith("from streamgen.models.masks ") for ln in imports), (f, imports)
    assert A.FrameMask is __import__("streamgen.models.masks", fromlist=["FrameMask"]).FrameMask


def _imports(path) -> set[str]:
    """Every module a source file imports (top level and lazy), relative ones made absolute."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    rel = path.relative_to(root).with_suffix("").parts
    pkg = ["streamgen", *rel[1:-1]] if rel[0] == "streamgen" else ["streamgen", *rel[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {mod} if node.module else {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m == "streamgen" or m.startswith("streamgen.")}


def test_layers_import_only_downwards():
    """cli -> engine -> models / codecs -> io (and config, errors): never back up."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    up = {"models": ("streamgen.engine", "streamgen.codecs", "streamgen.io", "streamgen.cli"),
          "codecs": ("streamgen.engine", "streamgen.models", "streamgen.cli"),
          "io": ("streamgen.engine", "streamgen.models", "streamgen.codecs", "streamgen.cli"),
          "config": ("streamgen.engine", "streamgen.models", "streamgen.codecs", "streamgen.io", "streamgen.cli")}
    bad = []
    for layer, banned in up.items():
        for f in sorted((root / "streamgen" / layer).glob("*.py")):
            bad += [(f.name, m) for m in _imports(f) if m.startswith(banned)]
    for f in sorted((root / "kernels").glob("*.py")):
        if f.name != "bench.py":                                         # a benchmark script, not a kernel
            bad += [(f.name, m) for m in _imports(f) if not m.startswith(("streamgen.kernels", "streamgen.models.masks",
                                                                         "streamgen.models.rope"))]
    assert not bad, bad
