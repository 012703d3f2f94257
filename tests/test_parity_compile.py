"""The compiled chunk step equals the eager one (CPU, aot_eager backend: traces the same graph
torch.compile would hand to inductor, without needing a C++ toolchain or a GPU)."""
from __future__ import annotations

import pytest
import torch

from streamgen.engine.compile import compile_model
from streamgen.engine.fp8 import quantize_fp8
from streamgen.engine.overlapped_decode import OverlappedDecoder
from streamgen.errors import ConfigError
from streamgen.engine.pipeline import Pipeline


def _frames(pipe, n=3):
    s = pipe.session("a compiled stream", seed=7)
    return [s.step_latents() for _ in range(n)]


def test_compiled_stream_equals_eager():
    torch._dynamo.reset()
    eager = Pipeline.from_pretrained("tiny", random_weights=True)
    ref = _frames(eager)
    comp = Pipeline.from_pretrained("tiny", random_weights=True)
    compile_model(comp.model, mode="default", backend="aot_eager")
    out = _frames(comp)
    for a, b in zip(ref, out):
        assert (a - b).abs().max().item() <= 1e-5


def test_options_are_validated():
    pipe = Pipeline.from_pretrained("tiny", random_weights=True)
    with pytest.raises(ConfigError, match="compile mode"):
        compile_model(pipe.model, mode="fast")
    with pytest.raises(ConfigError, match="quant"):
        quantize_fp8(pipe.model, mode="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp8"):
            quantize_fp8(pipe.model, mode="fp8")
    assert compile_model(pipe.model, mode="none") is pipe.model


def test_overlapped_decode_matches_sequential():
    pipe = Pipeline.from_pretrained("tiny", random_weights=True)
    lat = _frames(pipe)
    state, seq = pipe.vae.init_state(1), []
    for x0 in lat:
        f, state = pipe.vae.decode_chunk(x0, state)
        seq.append(pipe.to_uint8(f[0]))
    dec = OverlappedDecoder(pipe.vae, pipe.to_uint8)
    state, got = pipe.vae.init_state(1), []
    for x0 in lat:
        frames, state = dec.submit(x0, state).result()
        got.append(frames)
    dec.close()
    assert all((a == b).all() for a, b in zip(seq, got))
