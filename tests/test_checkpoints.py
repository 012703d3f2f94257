"""Checkpoint loading in every layout, config resolution, and one-line errors on bad files."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from streamgen.io.checkpoint import load_checkpoint, save_diffusers, save_release, save_sharded
from streamgen.cli import main as cli_main
from streamgen.config import PIPELINE_PRESETS, ModelConfig, PipelineConfig, to_dict
from streamgen.io.convert import detect_layout, diffusers_to_wan, wan_to_diffusers
from streamgen.errors import CheckpointError
from streamgen.models.model import WanDiT
from streamgen.engine.pipeline import Pipeline

TINY = PipelineConfig.from_name("tiny")


@pytest.fixture(scope="module")
def wan_sd():
    torch.manual_seed(123)
    m = WanDiT(TINY.model)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(model, sd):
    own = model.state_dict()
    assert set(own) == set(sd)
    for k in sd:
        assert torch.equal(own[k].float(), sd[k].float()), k


def _load(path, **kw):
    kw.setdefault("config", "tiny")
    return Pipeline.from_pretrained(str(path), **kw)


# ----------------------------------------------------------------------------- layouts
def test_self_forcing_pt_prefers_ema(tmp_path, wan_sd):
    other = {k: torch.zeros_like(v) for k, v in wan_sd.items()}
    ckpt = {"generator": {f"model.{k}": v for k, v in other.items()},
            "generator_ema": {f"model.{k}": v for k, v in wan_sd.items()},
            "critic": {"model.x": torch.zeros(1)}, "step": 100}
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(ckpt, path)
    pipe = _load(path)
    _same(pipe.model, wan_sd)
    frames = pipe.session("a test", seed=0).step()
    assert frames.shape == (TINY.sampler.chunk_frames, 64, 64, 3)


@pytest.mark.parametrize("wrapper", ["generator", "model"])
def test_training_checkpoint_wrappers(tmp_path, wan_sd, wrapper):
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: {f"model.{k}": v for k, v in wan_sd.items()}}, path)
    _same(_load(path).model, wan_sd)


def test_wan_safetensors_and_pth(tmp_path, wan_sd):
    save_file(wan_sd, tmp_path / "model.safetensors")
    _same(_load(tmp_path / "model.safetensors").model, wan_sd)
    torch.save(wan_sd, tmp_path / "model.pth")
    _same(_load(tmp_path / "model.pth").model, wan_sd)


def test_wan_sharded_directory_ignores_vae_and_t5(tmp_path, wan_sd):
    d = tmp_path / "Wan2.1-T2V-tiny"
    save_sharded(str(d), wan_sd, max_shard_bytes=40_000)
    assert len([n for n in os.listdir(d) if n.endswith(".safetensors")]) > 2
    torch.save({"junk": torch.zeros(3)}, d / "Wan2.1_VAE.pth")                  # must not be read
    torch.save({"junk": torch.zeros(3)}, d / "models_t5_umt5-xxl-enc-bf16.pth")
    _same(_load(d).model, wan_sd)


def test_diffusers_directory_converted_on_load(tmp_path, wan_sd):
    d = tmp_path / "transformer"
    save_diffusers(str(d), wan_sd, TINY.model)
    with open(d / "config.json") as f:
        assert json.load(f)["_class_name"] == "WanTransformer3DModel"
    ck = load_checkpoint(str(d), config="tiny")
    assert ck.layout == "diffusers"
    _same(_load(d).model, wan_sd)
    # a diffusers pipeline directory (transformer/ subfolder) and a single diffusers file
    _same(_load(tmp_path).model, wan_sd)
    save_file(wan_to_diffusers(wan_sd), tmp_path / "dit.safetensors")
    _same(_load(tmp_path / "dit.safetensors").model, wan_sd)


def test_conversion_round_trip_matches_diffusers_names(wan_sd):
    from diffusers import WanTransformer3DModel
    from streamgen.io.convert import model_to_diffusers_config
    ref = WanTransformer3DModel(**model_to_diffusers_config(TINY.model))
    dsd = wan_to_diffusers(wan_sd)
    assert set(dsd) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert dsd[k].shape == v.shape, k
    back = diffusers_to_wan(dsd)
    assert set(back) == set(wan_sd) and all(torch.equal(back[k], wan_sd[k]) for k in wan_sd)
    assert detect_layout(wan_sd) == "wan" and detect_layout(dsd) == "diffusers"


def test_release_carries_its_config(tmp_path, wan_sd):
    path = tmp_path / "release.safetensors"
    save_release(str(path), wan_sd, to_dict(TINY))
    pipe = Pipeline.from_pretrained(str(path))
    assert pipe.config == TINY
    _same(pipe.model, wan_sd)


# ----------------------------------------------------------------------------- configs
def test_family_presets_registered():
    for fam in ("self-forcing", "causvid", "longlive", "reward-forcing", "anchor-forcing",
                "rolling-forcing", "causal-forcing"):
        cfg = PipelineConfig.from_name(fam)
        assert cfg.model == ModelConfig.from_name("wan2.1-t2v-1.3b")
    sf, ll = PipelineConfig.from_name("self-forcing"), PipelineConfig.from_name("longlive")
    assert sf.sampler.chunk_frames == 3 and sf.cache.total_frames == 21 and sf.cache.rope == "absolute"
    assert tuple(sf.sampler.denoising_steps) == (1000, 750, 500, 250) and sf.sampler.shift == 5.0
    assert ll.cache.sink_frames == 3 and ll.cache.sink_frames + ll.cache.window_frames == 12
    assert ll.cache.prompt_switch == "recache"
    assert PipelineConfig.from_name("reward-forcing").cache.sink == "ema"
    assert PipelineConfig.from_name("anchor-forcing").cache.anchor_frames > 0
    assert PipelineConfig.from_name("causal-forcing").sampler.chunk_frames == 1


def test_family_guessed_from_name_and_model_from_shapes(tmp_path, wan_sd):
    d = tmp_path / "LongLive-1.3B"
    d.mkdir()
    torch.save({"generator": {f"model.{k}": v for k, v in wan_sd.items()}}, d / "longlive_base.pt")
    ck = load_checkpoint(str(d / "longlive_base.pt"))
    assert ck.family == "longlive"
    cfg = PipelineConfig.from_dict(ck.config)
    assert cfg.cache == PipelineConfig.from_name("longlive").cache
    assert cfg.model.dim == 64 and cfg.model.num_layers == 2 and cfg.model.text_dim == 32
    # explicit family wins over the name
    ck = load_checkpoint(str(d / "longlive_base.pt"), config="causal-forcing")
    assert PipelineConfig.from_dict(ck.config).sampler.chunk_frames == 1


def test_unnamed_checkpoint_defaults_to_self_forcing_with_warning(tmp_path, wan_sd):
    save_file(wan_sd, tmp_path / "weights.safetensors")
    with pytest.warns(UserWarning, match="self-forcing"):
        ck = load_checkpoint(str(tmp_path / "weights.safetensors"))
    assert ck.family == "self-forcing"


# ----------------------------------------------------------------------------- errors
class NotATensor:
    pass


def _bad_files(tmp_path, wan_sd):
    good = tmp_path / "good.safetensors"
    save_file(wan_sd, good)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    torch.save({"generator": {"model.x": NotATensor()}}, tmp_path / "object.pt")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"a": NotATensor()}, f)
    torch.save({"names": ["a", "b"], "lr": 0.1}, tmp_path / "notensors.pt")
    wrong = dict(wan_sd)
    wrong["blocks.1.self_attn.q.weight"] = torch.zeros(64, 32)
    save_file(wrong, tmp_path / "wrongshape.safetensors")
    missing = {k: v for k, v in wan_sd.items() if not k.startswith("blocks.1.ffn")}
    save_file(missing, tmp_path / "missing.safetensors")
    save_file({"encoder.conv.weight": torch.zeros(3, 3)}, tmp_path / "othermodel.safetensors")
    shard_dir = tmp_path / "sharded"
    idx = save_sharded(str(shard_dir), wan_sd, max_shard_bytes=40_000)
    with open(idx) as f:
        first = sorted(set(json.load(f)["weight_map"].values()))[0]
    os.remove(shard_dir / first)
    (tmp_path / "ints.safetensors").write_bytes(b"")
    save_file({k: (v * 100).to(torch.int32) for k, v in wan_sd.items()}, tmp_path / "ints.safetensors")
    return {
        "truncated.safetensors": "safetensors",
        "random.pt": "not a loadable checkpoint",
        "random.safetensors": "safetensors",
        "object.pt": "refused to unpickle",
        "plain.pkl": "not a loadable checkpoint",   # a bare pickle is not a torch file
        "notensors.pt": "no tensors",
        "wrongshape.safetensors": "blocks.1.self_attn.q.weight",
        "missing.safetensors": "missing",
        "othermodel.safetensors": "not a Wan2.1 DiT checkpoint",
        "sharded": "missing",
        "ints.safetensors": "not floating point",
        "does-not-exist.pt": "not found",
    }


def test_bad_files_raise_one_line_checkpoint_error(tmp_path, wan_sd):
    for name, needle in _bad_files(tmp_path, wan_sd).items():
        with pytest.raises(CheckpointError) as e:
            Pipeline.from_pretrained(str(tmp_path / name), config="tiny") if name != "does-not-exist.pt" \
                else load_checkpoint(str(tmp_path / name))
        msg = str(e.value)
        assert "\n" not in msg, (name, msg)
        assert needle.lower() in msg.lower(), (name, msg)


def test_cli_generate_bad_file_prints_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    rc = cli_main(["generate", "--model", str(bad), "--config", "tiny", "--frames", "3",
                   "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error:") and "bad.safetensors" in err[0]


def test_presets_untouched():
    # families register without overriding the lead's presets
    assert PIPELINE_PRESETS["wan2.1-t2v-1.3b"]["cache"] == dict(window_frames=-1, max_frames=21)
