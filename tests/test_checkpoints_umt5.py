"""The UMT5 text-encoder path with a tiny random UMT5EncoderModel + tokenizer built locally."""
from __future__ import annotations

import pytest
import torch

from streamgen.errors import ConfigError
from streamgen.codecs.factory import build_text_encoder
from streamgen.codecs.text import UMT5TextEncoder

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "moon", "red", "dog"]


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    d = tmp_path_factory.mktemp("umt5")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    transformers.UMT5EncoderModel(cfg).eval().save_pretrained(d)
    return str(d)


def test_umt5_output_wan_convention(umt5_dir):
    enc = build_text_encoder("umt5", text_dim=32, text_len=16, path=umt5_dir)
    out = enc("a red cat on the moon")
    assert out.shape == (1, 16, 32) and out.dtype == torch.float32
    n = 6 + 1                                                           # 6 words + EOS
    assert out[0, :n].abs().sum(-1).min() > 0
    assert torch.count_nonzero(out[0, n:]) == 0                         # padding zeroed
    # masked padding == encoding the real tokens alone (what Wan does, then zero-pads)
    ids = enc.tokenizer(["a red cat on the moon"], return_tensors="pt").input_ids
    with torch.no_grad():
        alone = enc.model(input_ids=ids).last_hidden_state
    assert ids.shape[1] == n
    assert (out[0, :n] - alone[0]).abs().max() <= 1e-5
    assert torch.equal(enc("  a red\tcat on   the moon "), out)         # Wan's whitespace cleaning
    assert not torch.allclose(enc("a dog"), out)


def test_umt5_errors(umt5_dir, tmp_path):
    with pytest.raises(ConfigError, match="text_dim=64"):
        UMT5TextEncoder(umt5_dir, text_len=16, text_dim=64)
    with pytest.raises(ConfigError, match="local directory"):
        UMT5TextEncoder(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="cannot load"):
        UMT5TextEncoder(str(tmp_path))


def test_pipeline_with_umt5(umt5_dir):
    from streamgen.engine.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("tiny", random_weights=True, text_encoder="umt5", text_encoder_path=umt5_dir)
    frames = pipe.session("a cat on the moon", seed=0).step()
    assert frames.shape[1:] == (64, 64, 3)
