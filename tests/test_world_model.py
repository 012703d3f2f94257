"""Release-3 world-model pieces: exploring policy, clean-context training functions, sessions
that open from real frames, and the continuation metric."""
import math

import numpy as np
import pytest
import torch

from streamgen import Pipeline
from streamgen.errors import ConfigError
from streamgen.eval.continuation import continuation, psnr, ssim, walk
from streamgen.training import losses as L
from streamgen.world.episodes import generate_clip, opening_frames
from streamgen.world.policies import explore_policy
from streamgen.world.render import World


# ----------------------------------------------------------------------------- policy
def test_explore_policy_walks_the_maze():
    far, turned = 0, 0
    for seed in range(6):
        w = World(seed)
        acts = explore_policy(w, np.random.default_rng([seed, 13]), 96)
        assert len(acts) == 96
        p = w.poses(acts)
        travel = np.abs(np.diff(p[:, :2], axis=0)).sum()
        far += travel > 3.0                       # at least 3 cells in 6 s
        turned += np.abs(np.diff(np.unwrap(p[:, 2]))).sum() > math.pi / 2
        # it walks along corridor centre lines: never hugs a wall for long
        assert all(not w.blocked(x, y) for x, y, _ in p)
    assert far >= 5 and turned >= 5
    again = explore_policy(World(3), np.random.default_rng([3, 13]), 48)
    assert again == explore_policy(World(3), np.random.default_rng([3, 13]), 48)


def test_clip_warmup_offsets_the_walk():
    a = generate_clip(5, 12, policy="explore", warmup=0)
    b = generate_clip(5, 12, policy="explore", warmup=24)
    assert a["frames"].shape == b["frames"].shape == (12, 64, 64, 3)
    assert not np.allclose(a["pose"], b["pose"])


def test_opening_frames_face_a_corridor_and_continue():
    frames, ws = opening_frames("a hedge maze at day", 11, 3)
    assert frames.shape == (3, 64, 64, 3)
    w = World(11)
    x, y, yaw = w.view_pose()
    from streamgen.world.policies import free_run
    assert free_run(w, (x, y, yaw)) >= max(free_run(w, (x, y, yaw + k * math.pi / 2)) for k in range(4)) - 1e-9
    nxt = ws.step({"keys": ["W"], "mouse": [0.0, 0.0]})
    assert nxt.shape == (1, 64, 64, 3) and ws.t == 4


# ----------------------------------------------------------------------------- training functions
def test_clean_chunk_mask_modes():
    g = torch.Generator().manual_seed(0)
    assert not L.clean_chunk_mask(4, 8, "none", 1.0, g).any()
    m = L.clean_chunk_mask(256, 8, "prefix", 1.0, g)
    lengths = m.sum(1)
    assert (lengths >= 1).all() and (lengths <= 7).all()
    assert all(m[i, : lengths[i]].all() and not m[i, lengths[i]:].any() for i in range(256))
    assert not L.clean_chunk_mask(64, 8, "prefix", 0.0, g).any()
    b = L.clean_chunk_mask(512, 4, "bernoulli", 0.5, g)
    assert not b.all(1).any()                       # every clip keeps a noisy chunk
    assert 0.35 < b.float().mean() < 0.6
    with pytest.raises(ValueError):
        L.clean_chunk_mask(1, 4, "sometimes", 0.5, g)


def test_apply_clean_chunks_hand_case():
    t = torch.tensor([[500.0] * 6, [300.0] * 6])
    clean = torch.tensor([[True, False], [False, False]])
    t2, w = L.apply_clean_chunks(t, clean, 3)
    assert t2[0].tolist() == [0, 0, 0, 500, 500, 500] and t2[1].tolist() == [300] * 6
    # 9 noisy frames of 12: weight 12/9 on noisy frames, 0 on clean ones; mean 1
    assert torch.allclose(w[0], torch.tensor([0, 0, 0, 4 / 3, 4 / 3, 4 / 3]))
    assert torch.allclose(w.mean(), torch.tensor(1.0))


def test_rollout_from_a_real_opening_chunk():
    from streamgen.config import PipelineConfig
    from streamgen.models.model import WanDiT
    from streamgen.training.rollout import new_cache, rollout
    pcfg = PipelineConfig.from_name("tiny-world")
    torch.manual_seed(0)
    m = WanDiT(pcfg.model).eval()
    g = torch.Generator().manual_seed(1)
    gt = torch.randn(2, 9, 4, 8, 8, generator=g)
    cache = new_cache(pcfg, 2)
    cache.cross_kv = m.cross_kv(torch.randn(2, 16, 32, generator=g))
    ts = [1000.0, 500.0]
    x = rollout(m, cache, ts, torch.randn(2, 9, 4, 8, 8, generator=g), lambda s: torch.randn(s, generator=g),
                exit_step=1, context="self", gt=gt, start_frames=3, grad=False)
    assert torch.equal(x[:, :3], gt[:, :3]) and not torch.allclose(x[:, 3:], gt[:, 3:])
    assert cache.next_frame == [9, 9]


# ----------------------------------------------------------------------------- sessions with start frames
@pytest.fixture(scope="module")
def tiny():
    return Pipeline.from_pretrained("tiny-world", random_weights=True)


def test_session_start_equals_block_causal_forward(tiny):
    """The opening frames land in the cache exactly as clean context of the full forward."""
    p = tiny
    c = p.config
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (6, c.height, c.width, 3), dtype=np.uint8)
    s = p.session("x", seed=0, start=frames)
    assert s.start_source == "frames" and s.cache.next_frame == [6]
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[None] / 127.5 - 1
    z = p.vae.encode(video)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, *z.shape[2:], generator=g)
    with torch.no_grad():
        s.cache.begin_chunk(3)
        got = p.model(x, torch.full((1, 3), 700.0), cache=s.cache, action=p.encode_actions(None, 3))
        text = p.text_encoder("x")
        full_t = torch.tensor([[0.0] * 6 + [700.0] * 3])
        cc = c.cache
        ref = p.model(torch.cat([z, x], 1), full_t, text, action=p.encode_actions(None, 9),
                      attn_mode="block_causal", chunk_frames=3, sink_frames=cc.sink_frames,
                      window_frames=cc.window_frames)[:, 6:]
    assert (got - ref).abs().max().item() <= 1e-4


def test_session_start_world_and_bad_starts(tiny):
    s = tiny.session("an ice cave at night", seed=4, start="world")
    assert s.start_source == "world renderer" and s.start_frames.shape == (3, 64, 64, 3)
    assert s.step({"keys": ["W"]}).shape[0] == 3
    for bad, msg in [(np.zeros((4, 64, 64, 3), np.uint8), "whole number of chunks"),
                     (np.zeros((3, 32, 64, 3), np.uint8), "resize"),
                     (np.zeros((3, 64, 64, 3), np.float32), "uint8"),
                     ("video.mp4", "start must be"), ([1, 2, 3], "uint8 array")]:
        with pytest.raises(ConfigError, match=msg):
            tiny.session("x", start=bad)
    with pytest.raises(ConfigError, match="start_actions"):
        tiny.session("x", start=np.zeros((3, 64, 64, 3), np.uint8), start_actions=[{}, {}])


# ----------------------------------------------------------------------------- continuation metric
def test_psnr_ssim_reference_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    assert psnr(a, a) == float("inf") and abs(ssim(a, a) - 1.0) < 1e-9
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    assert 27.0 < psnr(a, b) < 29.0                 # ~ 10*log10(255^2/100) = 28.1
    assert ssim(a, 255 - a) < 0.0 < ssim(a, b) < 1.0


def test_edge_ratio_sees_blur():
    """A world walk against itself is 1; the same frames blurred (what beats copy-last on PSNR
    without showing a wall) score far lower; a flat frame scores 0."""
    import torch
    from streamgen.eval.continuation import edge_ratio
    f = walk(900700, 6)["frames"]
    x = torch.from_numpy(f).permute(0, 3, 1, 2).float()
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    blurred = blurred.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert abs(edge_ratio(f, f) - 1.0) < 1e-6
    assert edge_ratio(blurred, f) < 0.6
    assert psnr(blurred, f) > 20.0                  # the blur is close in PSNR
    assert edge_ratio(np.full_like(f, 90), f) == 0.0


def test_continuation_metric_runs_and_references_make_sense(tiny):
    w = walk(900700, 12)
    assert w["frames"].shape == (12, 64, 64, 3) and len(w["actions"]) == 12
    r = continuation(tiny, walks=2, chunks=2)
    assert len(r["model"]["psnr"]) == 2 and r["walks"] == 2
    # a random-weight model is far below copy-last; the autoencoder ceiling is its own reconstruction
    assert r["model"]["psnr_mean"] < r["copy_last"]["psnr_mean"]
    assert math.isfinite(r["action_sensitivity_db"])
    assert len(r["model"]["edge_ratio"]) == 2 and r["copy_last"]["edge_ratio_mean"] > 0
    with pytest.raises(ValueError, match="at least 2"):
        continuation(tiny, walks=1)


def test_release_folder_with_teacher_loads_the_student(tmp_path):
    """A release folder ships teacher.safetensors beside model.safetensors: loading the folder
    must give the student, never a merge of the two."""
    from streamgen.io.checkpoint import save_release
    from streamgen.config import to_dict
    p = Pipeline.from_pretrained("tiny-world", random_weights=True)
    cfg = to_dict(p.config)
    student = {k: v.clone() for k, v in p.model.state_dict().items()}
    teacher = {k: v + 1.0 for k, v in student.items()}
    save_release(str(tmp_path / "model.safetensors"), student, cfg)
    save_release(str(tmp_path / "teacher.safetensors"), teacher, cfg)
    got = Pipeline.from_pretrained(str(tmp_path))
    for k, v in got.model.state_dict().items():
        assert torch.equal(v, student[k]), k
