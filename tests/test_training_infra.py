"""Training infrastructure: config validation, SIGKILL resume, 2-rank gloo training, smoke stages."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from streamgen.codecs.autoencoder import TinyAutoencoder
from streamgen.io.checkpoint import read_weights, save_release
from streamgen.config import PipelineConfig, to_dict
from streamgen.errors import ConfigError
from streamgen.models.model import WanDiT
from streamgen.training.config import load_run_config, run_config_from_dict

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _fixture_releases(tmp):
    """Random tiny-world teacher + autoencoder releases (the students' inputs)."""
    torch.manual_seed(0)
    p = PipelineConfig.from_name("tiny-world")
    save_release(str(tmp / "teacher.safetensors"), WanDiT(p.model).state_dict(), to_dict(p))
    save_release(str(tmp / "ae.safetensors"), TinyAutoencoder(4, width=8).state_dict())


def _cfg(tmp, stage="dmd", **kw):
    c = dict(stage=stage, pipeline="tiny-world", out=str(tmp / stage), steps=12, batch_size=2, log_every=1,
             ckpt_every=2, threads=1, progress="none", gen_every=2, teacher=str(tmp / "teacher.safetensors"),
             init="teacher", autoencoder=str(tmp / "ae.safetensors"),
             data=dict(clips=20, clip_frames=6, cache_dir=str(tmp / "data")))
    c.update(kw)
    path = tmp / f"{stage}-{c['out'].split('/')[-1]}.yaml"
    path.write_text(yaml.safe_dump(c))
    return str(path)


def _train(cfg_path, *extra, timeout=60):
    cmd = [sys.executable, "-m", "streamgen.training.train", "--config", cfg_path, *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        run_config_from_dict({"stage": "teacher", "lr": 1})
    with pytest.raises(ConfigError, match="stage"):
        run_config_from_dict({"stage": "nope"})
    with pytest.raises(ConfigError, match="teacher release"):
        run_config_from_dict({"stage": "dmd"})
    cfg = run_config_from_dict({"stage": "teacher", "optim": {"lr": 1e-3, "betas": [0, 0.999]}},
                               overrides={"steps": 5, "data.clips": 7})
    assert cfg.steps == 5 and cfg.data.clips == 7 and cfg.optim.betas == (0, 0.999)


def test_shipped_recipes_parse():
    root = os.path.join(os.path.dirname(__file__), "..", "training", "configs")
    found = 0
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".yaml"):
                load_run_config(os.path.join(d, f))
                found += 1
    assert found >= 8
    wan = load_run_config(os.path.join(root, "wan2.1-1.3b-self-forcing-dmd.yaml"))
    assert wan.optim.lr == 2e-6 and wan.critic_optim.lr == 4e-7 and wan.gen_every == 5
    assert wan.guidance == 3.0 and wan.shift == 5.0 and wan.ema_decay == 0.99 and wan.ema_start == 200
    assert list(wan.pipeline_config().sampler.denoising_steps) == [1000, 750, 500, 250]


def test_sigkill_resume_continues_identically(tmp_path):
    _fixture_releases(tmp_path)
    ref = _cfg(tmp_path, out=str(tmp_path / "ref"), steps=24)
    r = _train(ref)
    assert r.returncode == 0, r.stderr[-2000:]
    run = _cfg(tmp_path, out=str(tmp_path / "killed"), steps=24)
    proc = subprocess.Popen([sys.executable, "-m", "streamgen.training.train", "--config", run], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "ckpt"
    t0 = time.time()
    while time.time() - t0 < 50 and not any(n.startswith("step-") and n.endswith(".pt")
                                            for n in (os.listdir(ck) if ck.exists() else [])):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "done.json").exists(), "the run finished before it could be killed"
    r = _train(run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a, _ = read_weights(str(tmp_path / "ref" / "release.safetensors"))
    b, _ = read_weights(str(tmp_path / "killed" / "release.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "ref" / "ckpt" / "step-00000024.pt", weights_only=True)
    sb = torch.load(tmp_path / "killed" / "ckpt" / "step-00000024.pt", weights_only=True)
    for k in sa["model.critic"]:
        assert torch.equal(sa["model.critic"][k], sb["model.critic"][k]), k


WORKER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from streamgen.training.config import load_run_config
    from streamgen.training.distributed import Dist
    from streamgen.training.trainers import build_stage
    cfg = load_run_config(sys.argv[1])
    d = Dist()
    stage = build_stage(cfg, d)
    init = {k: v.clone() for k, v in stage.mods["generator"].state_dict().items()}
    for step in range(3):
        stage.step(step)
    out = {"gen": stage.mods["generator"].state_dict(), "critic": stage.mods["critic"].state_dict(),
           "init": init, "world": d.world}
    torch.save(out, os.path.join(sys.argv[2], f"rank{d.rank}.pt"))
    d.close()
""")


def test_two_rank_gloo_identical_weights(tmp_path):
    _fixture_releases(tmp_path)
    cfg = _cfg(tmp_path, out=str(tmp_path / "ddp"), steps=3, gen_every=1)
    # render/encode the data once, so both ranks read the same cache
    r = _train(_cfg(tmp_path, stage="teacher", out=str(tmp_path / "prep"), steps=0))
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), cfg, str(tmp_path)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["world"] == 2
    moved = False
    for part in ("gen", "critic"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in a["gen"]:
        moved |= not torch.equal(a["gen"][k], a["init"][k])
    assert moved, "the generator did not train"


def test_smoke_every_stage(tmp_path):
    """CI smoke: autoencoder -> teacher -> ode_init -> consistency -> dmd -> TF -> DF -> causal init
    with its own context (a frame_cond model), a few steps each."""
    root = os.path.join(os.path.dirname(__file__), "..", "training", "configs", "smoke")
    for name in sorted(os.listdir(root)):
        cfg = yaml.safe_load(open(os.path.join(root, name)))
        for key in ("out", "autoencoder", "teacher", "init"):
            if key in cfg and cfg[key] and cfg[key] != "teacher":
                cfg[key] = cfg[key].replace("runs/smoke", str(tmp_path))
        cfg["data"]["cache_dir"] = str(tmp_path / "data")
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
    r = _train(str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("autoencoder", "teacher", "ode_init", "consistency", "dmd", "teacher_forcing",
                  "diffusion_forcing", "causal_self"):
        assert (tmp_path / stage / "release.safetensors").exists(), stage
        assert (tmp_path / stage / "metrics.jsonl").exists(), stage
    assert (tmp_path / "dmd" / "loss.png").exists()
    assert any(n.endswith(".mp4") for n in os.listdir(tmp_path / "dmd" / "samples"))
    # the release export: config.json + model + autoencoder, loadable and streamable
    from streamgen.training.export import export, load_release
    info = export(str(tmp_path), "dmd", dest=str(tmp_path / "release"), gif="sample.gif", gif_seconds=0.5,
                  shift=2.0)
    assert all(s < 16 * 2 ** 20 for s in info["sizes"].values())
    pipe = load_release(str(tmp_path / "release"))
    assert pipe.config.sampler.shift == 2.0              # --shift reaches the release's config
    frames = pipe.session("a brick dungeon", seed=0).step({"keys": ["W"]})
    assert frames.shape == (3, 64, 64, 3) and (tmp_path / "release" / "sample.gif").exists()


def test_yaml_reads_scientific_floats_and_model_rejects_strings(tmp_path):
    """PyYAML alone reads `1e-4` as a string; run configs and --set values must not."""
    from streamgen.config import ModelConfig
    from streamgen.errors import ConfigError
    from streamgen.training.config import load_run_config, yaml_load
    assert yaml_load("a: 1e-4\nb: -2E+3\nc: 1e3x\nd: 7") == {"a": 1e-4, "b": -2000.0, "c": "1e3x", "d": 7}
    p = tmp_path / "run.yaml"
    p.write_text("stage: teacher\npipeline: tiny-world\noptim: {lr: 3e-4, warmup: 0}\n")
    assert load_run_config(str(p)).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="eps"):
        ModelConfig(eps="1e-06")


def _torchrun(cfg_path, *extra, env=None, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "streamgen.training.train", "--config", cfg_path, *extra]
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def test_fsdp2_two_rank_sharded_checkpoint_resume(tmp_path):
    """FSDP2 (on CPU/gloo here) checkpoints with torch.distributed.checkpoint: each rank writes its
    shards (models, optimizers, EMA, its RNG), nothing is gathered; a run stopped and resumed from
    them reaches the same state bit for bit; a run that finishes writes whole (gathered) EMA
    weights to its release file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    _fixture_releases(tmp_path)
    env = dict(ENV, STREAMGEN_FSDP="1")
    r = _train(_cfg(tmp_path, stage="teacher", out=str(tmp_path / "prep"), steps=0))
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _cfg(tmp_path, stage="teacher", out=str(tmp_path / "ref"), steps=6)
    r = _torchrun(ref, "--stop-after", "5", env=env)                  # checkpoints at 2 and 4
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = _cfg(tmp_path, stage="teacher", out=str(tmp_path / "resumed"), steps=6)
    r = _torchrun(run, "--stop-after", "2", env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ck = tmp_path / "resumed" / "ckpt"
    assert sorted(os.listdir(ck)) == ["step-00000002"]
    assert sorted(os.listdir(ck / "step-00000002")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    r = _torchrun(run, "--stop-after", "2", env=env)                  # resumes at 2, saves 4
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "resumed from" in r.stdout and "step-00000002" in r.stdout
    full = {}
    for name in ("ref", "resumed"):
        assert sorted(os.listdir(tmp_path / name / "ckpt")) == ["step-00000002", "step-00000004"]
        dcp_to_torch_save(str(tmp_path / name / "ckpt" / "step-00000004"), str(tmp_path / f"{name}.pt"))
        full[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    sa, sb = full["ref"], full["resumed"]
    assert int(sa["step"]) == 4 and {"rng_cpu.rank0", "rng_cpu.rank1", "model.dit", "optim.dit", "ema"} <= set(sa)
    init, _ = read_weights(str(tmp_path / "teacher.safetensors"))
    assert sa["model.dit"].keys() == init.keys()                      # whole tensors, Wan names
    assert any(not torch.equal(sa["model.dit"][k], init[k]) for k in init)  # it trained
    for part in ("model.dit", "ema"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)
    for k, v in sa["optim.dit"]["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(sb["optim.dit"]["state"][k][name])), (k, name)
    r = _torchrun(ref, env=env)                                        # finish: step 6, export
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rel, _ = read_weights(str(tmp_path / "ref" / "release.safetensors"))
    assert {k: v.shape for k, v in rel.items()} == {k: v.shape for k, v in init.items()}
    assert any(not torch.equal(rel[k], init[k]) for k in init) and all(v.isfinite().all() for v in rel.values())


@pytest.mark.parametrize("teacher_attn", ["bidirectional", "block_causal"])
def test_dmd_real_score_and_critic_attend_as_teacher_attn_says(tmp_path, teacher_attn, monkeypatch):
    """A causal model can serve as DMD's real score (teacher_attn: block_causal): then the teacher
    and the critic run with the student's block-causal mask; by default both see the whole clip."""
    from streamgen.training.distributed import Dist
    from streamgen.training.trainers import build_stage
    monkeypatch.setenv("WORLD_SIZE", "1")
    _fixture_releases(tmp_path)
    cfg = load_run_config(_cfg(tmp_path, gen_every=1, teacher_attn=teacher_attn, start_chunks=1))
    stage = build_stage(cfg, Dist())
    seen = []

    def spy(mod, name):
        fwd = mod.forward

        def run(*a, **k):
            seen.append((name, k.get("attn_mode", "bidirectional")))
            return fwd(*a, **k)
        monkeypatch.setattr(mod, "forward", run)
    spy(stage.teacher, "teacher")
    spy(stage.mods["critic"], "critic")
    out = stage.step(0)
    assert torch.isfinite(torch.tensor(out["dmd_loss"]))
    assert {n for n, _ in seen} == {"teacher", "critic"} and {m for _, m in seen} == {teacher_attn}
    with pytest.raises(ConfigError, match="teacher_attn"):
        run_config_from_dict({"stage": "dmd", "teacher": "x", "teacher_attn": "causal"})


def test_autoencoder_decoder_only_keeps_encoder_and_latent_stats(tmp_path):
    """ae_train: decoder fine-tunes the init's decoder; its encoder and normalisation (which
    the DiTs were trained on) come out bit for bit the same."""
    _fixture_releases(tmp_path)
    init, _ = read_weights(str(tmp_path / "ae.safetensors"))
    init["latent_mean"].fill_(0.25)
    save_release(str(tmp_path / "ae.safetensors"), init)
    cfg = _cfg(tmp_path, stage="autoencoder", out=str(tmp_path / "dec"), steps=3, ae_train="decoder",
               ae_edge_loss=1.0, init=str(tmp_path / "ae.safetensors"))
    r = _train(cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    out, _ = read_weights(str(tmp_path / "dec" / "release.safetensors"))
    assert set(out) == set(init)
    for k in init:
        if k.startswith("decoder."):
            assert not torch.equal(out[k], init[k]), f"{k} did not train"
        else:
            assert torch.equal(out[k], init[k]), f"{k} changed"
    with pytest.raises(ConfigError, match="init"):
        run_config_from_dict({"stage": "autoencoder", "ae_train": "decoder"})
    with pytest.raises(ConfigError, match="ae_train"):
        run_config_from_dict({"stage": "autoencoder", "ae_train": "encoder"})


def test_adamw_lr_mult_groups_by_prefix_and_update_scales_them():
    import pytest as _pytest
    from streamgen.errors import ConfigError
    from streamgen.training.config import OptimConfig
    from streamgen.training.trainers import adamw
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = adamw(m, OptimConfig(lr=1e-3, lr_mult={"1.": 10}))
    mults = sorted((g["lr_mult"], len(g["params"])) for g in opt.param_groups)
    assert mults == [(1.0, 2), (10.0, 2)]                      # "1." = the second layer's weight + bias
    with _pytest.raises(ConfigError, match="lr_mult"):
        OptimConfig(lr_mult={"x": 0}).validate()


def test_load_dit_init_reset_moves_a_dit_to_a_new_latent(tmp_path):
    """A DiT on a new latent (other channels and patch) keeps every block of its init and draws
    its patch embedding and head fresh; without init_reset the mismatch is a clear error."""
    import dataclasses
    import types
    import pytest as _pytest
    from streamgen.config import PipelineConfig
    from streamgen.errors import StreamgenError
    from streamgen.io.checkpoint import save_release
    from streamgen.models.model import WanDiT
    from streamgen.training.trainers import load_dit
    old = PipelineConfig.from_name("tiny-world")
    src = WanDiT(old.model)
    save_release(str(tmp_path / "old.safetensors"), src.state_dict())
    new = dataclasses.replace(old, model=dataclasses.replace(old.model, in_channels=2, out_channels=2,
                                                             patch_size=(1, 4, 4)))
    dist = types.SimpleNamespace(device=torch.device("cpu"))
    with _pytest.raises(StreamgenError, match="shape mismatch"):
        load_dit(new, str(tmp_path / "old.safetensors"), dist)
    m = load_dit(new, str(tmp_path / "old.safetensors"), dist, reset=("patch_embedding", "head.head"))
    assert torch.equal(m.blocks[1].ffn[0].weight, src.blocks[1].ffn[0].weight)
    assert m.patch_embedding.weight.shape[1] == 2
