"""The TAEHV-style causal decoder: streaming == full decode, files, selection, distillation smoke."""
from __future__ import annotations

import pytest
import torch

from streamgen.config import PipelineConfig
from streamgen.errors import CheckpointError, ConfigError
from streamgen.codecs.taehv import TAEHV, TAEHVConfig
from streamgen.codecs.factory import build_vae

SMALL = TAEHVConfig(latent_channels=4, channels=(16, 16, 8, 8), blocks_per_stage=2)


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    return TAEHV(SMALL).eval()


def test_shapes_match_wan_frame_counts(dec):
    z = torch.randn(2, 3, 4, 4, 6)                                     # [B, F, C, h, w]
    frames, state = dec.decode_chunk(z, dec.init_state(2))
    assert frames.shape == (2, 1 + 4 * 2, 3, 32, 48)
    frames, _ = dec.decode_chunk(z, state)
    assert frames.shape == (2, 12, 3, 32, 48)
    assert frames.min() >= -1 and frames.max() <= 1


@pytest.mark.parametrize("split", [(1, 1, 1, 1, 1, 1), (3, 3), (2, 1, 3)])
def test_chunked_equals_full(dec, split):
    z = torch.randn(1, 6, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = dec.decode(z)
        state, outs, s = dec.init_state(1), [], 0
        for n in split:
            f, state = dec.decode_chunk(z[:, s:s + n], state)
            outs.append(f)
            s += n
    err = (torch.cat(outs, 1) - full).abs().max().item()
    assert err <= 1e-5, err


def test_decoder_is_causal_and_uses_the_past(dec):
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    z2 = z.clone()
    z2[:, 3] += 1.0                                                    # change only the last frame
    with torch.no_grad():
        a, b = dec.decode(z), dec.decode(z2)
    n_before = 1 + 4 * 2                                               # frames of latents 0..2
    assert torch.equal(a[:, :n_before], b[:, :n_before])
    z3 = z.clone()
    z3[:, 0] += 1.0                                                    # change the first frame
    with torch.no_grad():
        c = dec.decode(z3)
    assert not torch.allclose(a[:, -4:], c[:, -4:])                    # memory reaches later frames


def test_save_load_and_build_vae(tmp_path, dec):
    path = str(tmp_path / "taehv.safetensors")
    dec.save(path)
    again = build_vae("taehv", 4, 8, 4, path=path)
    z = torch.randn(1, 2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(dec.decode(z), again.decode(z))
    with pytest.raises(CheckpointError, match="4-channel latents, the model makes 16"):
        build_vae("taehv", 16, 8, 4, path=path)
    with pytest.raises(ConfigError, match="needs weights"):
        build_vae("taehv", 16, 8, 4)
    assert build_vae("taehv", 16, 8, 4, random_weights=True).latent_channels == 16
    assert PipelineConfig.from_dict({**{"vae": "taehv"}}).vae == "taehv"


def test_distillation_smoke_reduces_loss(tmp_path):
    from streamgen.training.distill_decoder import main as distill_main
    from streamgen.training.distill_decoder import build_parser, distill
    out = str(tmp_path / "student.safetensors")
    args = build_parser().parse_args(["--teacher-config", "tiny", "--out", out, "--steps", "40",
                                      "--latent-frames", "2", "--latent-height", "4", "--latent-width", "4",
                                      "--student-channels", "16,16,8,8", "--lr", "3e-3", "--log-every", "1000"])
    res = distill(args)
    first, last = sum(res["losses"][:5]) / 5, sum(res["losses"][-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert TAEHV.load(out, latent_channels=4).latent_channels == 4
    assert distill_main(["--out", out, "--steps", "1"]) == 2            # no teacher: one error line
