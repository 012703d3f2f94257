"""`streamgen generate`: exact frame counts with stride-4 decoders, --start noise|world|IMAGE|VIDEO,
the attention-fallback warning, --version and --help defaults.

Runs the CLI in-process (``streamgen.cli.main``) so torch is imported once.
"""
import json
import os

import numpy as np
import pytest

from streamgen import cli
from streamgen.io.video import read_video, write_mp4


def gen(capsys, *args):
    rc = cli.main(["generate", "--threads", "1", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def stride4_model(tmp_path_factory):
    """A streamgen release folder: the tiny preset with a TAEHV decoder of temporal stride 4
    (the first chunk decodes to 1 + 4(k-1) frames, later chunks to 4k)."""
    from safetensors.torch import save_file
    from streamgen.config import PIPELINE_PRESETS, PipelineConfig, to_dict
    from streamgen.models.model import WanDiT
    d = tmp_path_factory.mktemp("stride4")
    cfg = PipelineConfig.from_dict({**PIPELINE_PRESETS["tiny"], "vae": "taehv", "temporal_stride": 4})
    (d / "config.json").write_text(json.dumps(to_dict(cfg)))
    sd = {k: v.contiguous() for k, v in WanDiT(cfg.model).state_dict().items()}
    save_file(sd, str(d / "model.safetensors"))
    return str(d)


@pytest.mark.parametrize("frames", [48, 7, 13])
def test_stride4_decoder_writes_exact_frames(tmp_path, capsys, stride4_model, frames):
    out = tmp_path / "v.mp4"
    rc, so, se = gen(capsys, "--model", stride4_model, "--random-weights", "--frames", str(frames), "--out", str(out))
    assert rc == 0, se
    assert read_video(str(out)).shape[0] == frames      # was 45 for 48: chunks assumed 4k frames each
    assert f"({frames} frames" in so


def test_stride4_frame_bookkeeping(stride4_model):
    from streamgen.engine.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(stride4_model, random_weights=True)
    assert cli.chunk_video_frames(pipe, first=True) == 9 and cli.chunk_video_frames(pipe, first=False) == 12
    s = pipe.session("x", seed=0)
    assert len(s.step()) == 9 and len(s.step()) == 12          # what the decoder really gives
    acts = [{"keys": [], "mouse": [float(i), 0.0]} for i in range(40)]
    # latent frames of the first chunk start at video frames 0, 1, 5; of the next (from frame 9) 9, 13, 17
    assert [a["mouse"][0] for a in cli.chunk_actions(pipe, acts, 0, True)] == [0, 1, 5]
    assert [a["mouse"][0] for a in cli.chunk_actions(pipe, acts, 9, False)] == [9, 13, 17]
    assert cli.start_chunk_frames(pipe, 1) == 9 and cli.start_chunk_frames(pipe, 2) == 21


def test_world_start_is_default_for_world_models(tmp_path, capsys):
    from streamgen.world.episodes import opening_frames
    out = tmp_path / "w.mp4"
    rc, so, se = gen(capsys, "--model", "tiny-world", "--random-weights", "--frames", "8", "--seed", "5",
                     "--prompt", "an ice cave at night, thick fog", "--out", str(out))
    assert rc == 0, se
    assert "opening frames: 3 from the world renderer (frames 0-2); generated 5 frames" in so
    video = read_video(str(out))
    assert video.shape == (8, 64, 64, 3)
    want, _ = opening_frames("an ice cave at night, thick fog", 5, 3, 64)
    err = np.abs(video[:3].astype(np.float32) - want.astype(np.float32)).mean()
    assert err < 6, f"the file does not begin with the world's opening frames (mean abs diff {err:.1f})"
    rc, so, se = gen(capsys, "--model", "tiny-world", "--random-weights", "--frames", "4", "--start", "noise",
                     "--out", str(out))
    assert rc == 0, se
    assert "opening frames: none" in so and read_video(str(out)).shape[0] == 4


def test_image_and_video_starts(tmp_path, capsys):
    from PIL import Image
    img = np.zeros((60, 120, 3), np.uint8)
    img[:, 30:90] = (200, 40, 40)                     # the centre square survives the centre crop
    Image.fromarray(img).save(tmp_path / "start.png")
    out = tmp_path / "i.mp4"
    rc, so, se = gen(capsys, "--model", "tiny", "--random-weights", "--frames", "6",
                     "--start", str(tmp_path / "start.png"), "--out", str(out))
    assert rc == 0, se
    assert "opening frames: 3 from" in so and "centre-cropped" in so
    v = read_video(str(out))
    assert v.shape == (6, 64, 64, 3)
    assert abs(float(v[:3, 8:56, 8:56, 0].mean()) - 200) < 12 and float(v[:3, 8:56, 8:56, 2].mean()) < 60
    clip = np.random.default_rng(0).integers(0, 255, (20, 48, 80, 3), dtype=np.uint8)
    write_mp4(str(tmp_path / "start.mp4"), clip)
    rc, so, se = gen(capsys, "--model", "tiny", "--random-weights", "--frames", "12",
                     "--start", str(tmp_path / "start.mp4"), "--out", str(out))
    assert rc == 0, se
    assert "opening frames: 6 from" in so and "its first 6 frames" in so     # cache holds 2 chunks of context
    assert read_video(str(out)).shape[0] == 12


def test_start_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "one.mp4").write_bytes(b"")
    short = np.zeros((2, 64, 64, 3), np.uint8)
    write_mp4(str(tmp_path / "short.mp4"), short)
    cases = {
        "no such file": (["--start", str(tmp_path / "nope.png")], "no such file"),
        "not a video": (["--start", str(tmp_path / "one.mp4")], "not a readable"),
        "too short": (["--start", str(tmp_path / "short.mp4")], "one chunk needs 3"),
        "no room": (["--model", "tiny-world", "--frames", "3"], "leaves no room"),
        "switch in opening": (["--model", "tiny-world", "--switch-prompt", "1:an ice cave"], "opening frames"),
    }
    for name, (extra, want) in cases.items():
        args = ["--model", "tiny", "--random-weights", "--frames", "6", "--out", str(tmp_path / "o.mp4")]
        rc, so, se = gen(capsys, *args, *extra)
        lines = [ln for ln in se.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and want in lines[0], (name, se)
        assert "Traceback" not in se


def test_attention_fallback_warns_before_work(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("flash may really run here")
    rc, so, se = gen(capsys, "--model", "tiny", "--random-weights", "--frames", "3", "--attn-backend", "flash",
                     "--out", str(tmp_path / "a.mp4"))
    assert rc == 0, se
    warn = [i for i, ln in enumerate(se.splitlines()) if ln.startswith("warning: --attn-backend flash")]
    assert warn and "running sdpa instead" in se.splitlines()[warn[0]]
    assert se.index("warning: --attn-backend") < se.index("chunks")        # before any work


def test_version_and_help_defaults(capsys):
    from streamgen import __version__
    from streamgen.models.attention import BACKENDS
    from streamgen.cli_args import ATTN_BACKENDS
    assert set(ATTN_BACKENDS) == set(BACKENDS)
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    h = " ".join(capsys.readouterr().out.split())
    for want in (f"(default: {cli.DEFAULT_PROMPT})", "(default: out/streamgen.mp4)", "(default: 48)",
                 "--start noise|world|IMAGE|VIDEO", "begins with the opening frames", "(default: sdpa)"):
        assert want in h, want
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--frames", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: argument --frames")


def test_default_prompt_names_a_known_look():
    from streamgen.world.scene import parse_prompt
    look = parse_prompt(cli.DEFAULT_PROMPT)
    assert (look.theme, look.time, look.weather) == ("brick dungeon", "dusk", "hazy")


def test_shipped_dir_matches_pipeline():
    from streamgen.cli_args import shipped_dir
    from streamgen.engine.pipeline import SHIPPED
    assert os.path.samefile(shipped_dir("default"), SHIPPED["default"]) or not os.path.exists(SHIPPED["default"])
