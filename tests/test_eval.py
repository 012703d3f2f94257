"""Evaluation suite: metric primitives, shipped evaluators, and sanity of the whole suite:
ground truth scores at the ceiling, frozen and shuffled videos score badly where they should."""
import json

import numpy as np
import pytest

from streamgen.eval import metrics as M
from streamgen.eval.cli import main as eval_main
from streamgen.eval.evaluators import ASSETS, Evaluators
from streamgen.eval.suite import CorruptedGenerator, EvalSettings, GroundTruthGenerator, run_suite
from streamgen.world.episodes import TRANSITION

SMALL = EvalSettings(rollouts=2, rollout_frames=64, drift_seconds=(4.0,), drift_window=2.0, drift_rollouts=1,
                     switch_pre=16, switch_post=32)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 8))
    assert M.frechet_distance(a, a) < 1e-6
    shift = M.frechet_distance(a, a + 2.0)
    assert abs(shift - 4.0 * 8) < 1e-6
    assert M.frechet_distance(a, 3 * a) > 10


def test_action_agreement_scale():
    rng = np.random.default_rng(0)
    keys = rng.random((300, 4)) < 0.4
    turn = rng.integers(0, 3, 300)
    assert M.action_agreement(keys, turn, keys, turn)["score"] == pytest.approx(1.0)
    none = M.action_agreement(np.zeros_like(keys), np.ones_like(turn), keys, turn)
    assert abs(none["score"]) < 1e-9
    rand = M.action_agreement(rng.random((300, 4)) < 0.4, rng.integers(0, 3, 300), keys, turn)
    assert abs(rand["score"]) < 0.2


def test_shipped_evaluators_small_and_accurate():
    info = json.loads((ASSETS / "evaluators.json").read_text())
    for name in ("idm", "encoder", "theme"):
        size = (ASSETS / f"{name}.safetensors").stat().st_size
        assert size <= 16 * 2**20 and size == info["nets"][name]["bytes"]
    assert info["nets"]["theme"]["heldout_accuracy"] > 0.8
    assert info["nets"]["idm"]["heldout_turn_accuracy"] > 0.6
    ev = Evaluators.load()
    assert ev.info == info


@pytest.fixture(scope="module")
def reports():
    ev = Evaluators.load()
    return {k: run_suite(g, SMALL, ev) for k, g in
            (("gt", GroundTruthGenerator()), ("frozen", CorruptedGenerator("frozen")),
             ("shuffled", CorruptedGenerator("shuffled")), ("gt3", GroundTruthGenerator(chunk=3)))}


def test_ground_truth_at_ceiling(reports):
    m = reports["gt"]["metrics"]
    assert m["action_following"]["ratio"] == pytest.approx(1.0)
    assert m["action_following"]["ground_truth"]["score"] > 0.2          # IDM well above chance (0)
    assert m["revisit"]["model"]["similarity"] == pytest.approx(1.0)
    assert m["world_fd"]["model"] < 1e-6 < m["world_fd"]["other_seeds"]
    assert all(c["fd"] < 1e-6 for c in m["drift"]["curve"])
    ps = m["prompt_switch"]["model"]
    assert ps["switched_fraction"] == 1.0 and ps["frames_to_switch"] <= TRANSITION
    # a chunked generator (3 frames per step) is measured the same way and still at the ceiling
    m3 = reports["gt3"]["metrics"]
    assert m3["action_following"]["ratio"] == pytest.approx(1.0)
    assert m3["revisit"]["model"]["similarity"] == pytest.approx(1.0)


def test_frozen_scores_badly(reports):
    m, gt = reports["frozen"]["metrics"], reports["gt"]["metrics"]
    assert m["action_following"]["ratio"] < 0.3
    assert m["revisit"]["model"]["motion"] < 0.05
    assert m["world_fd"]["model"] > 1.0                    # ground truth: 0
    assert m["prompt_switch"]["model"]["switched_fraction"] == 0.0
    assert gt["prompt_switch"]["model"]["post_accuracy"] > m["prompt_switch"]["model"]["post_accuracy"]


def test_shuffled_scores_badly(reports):
    m = reports["shuffled"]["metrics"]
    assert m["action_following"]["ratio"] < 0.3
    assert m["revisit"]["model"]["similarity"] < 0.6
    assert m["world_fd"]["model"] > 1.0                    # ground truth: 0
    assert min(c["fd"] for c in m["drift"]["curve"]) > 0


def test_eval_cli_ground_truth(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = eval_main(["--model", "ground-truth", "--json", "--out", str(out), "--rollouts", "1",
                    "--rollout-frames", "32", "--drift-seconds", "2", "--drift-window", "1",
                    "--drift-rollouts", "1", "--switch-pre", "8", "--switch-post", "24"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"] == "ground-truth" and rep["metrics"]["action_following"]["ratio"] == pytest.approx(1.0)
    assert "idm" in rep["evaluators"]["nets"] and json.loads(out.read_text())["settings"]["rollouts"] == 1
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [["--model", "ground-truth", "--metrics", "nope"],
                                  ["--model", "ground-truth", "--drift-seconds", "-1"],
                                  ["--model", "/no/such/checkpoint-xyz"]])
def test_eval_cli_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert eval_main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and "Traceback" not in "\n".join(err)


def test_effective_targets_hand_computed():
    """Poses -> the motion the frames show: forward / strafe in the new heading, blocked = nothing."""
    from streamgen.eval.evaluators import effective_targets
    r = np.radians(7.5)
    poses = np.array([[1.0, 1.0, 0.0],
                      [1.1, 1.0, 0.0],          # +x at yaw 0: forward (W)
                      [1.1, 1.07, 0.0],         # +y at yaw 0: the right-hand side (D)
                      [1.1, 1.07, 0.0],         # blocked by a wall: no key
                      [1.1, 1.07, r],           # yaw +7.5 deg = mouse dx 1: turn right
                      [1.1, 1.07, 0.0],         # and back: turn left
                      [1.1 - 0.1 * np.cos(0.0), 1.07, 0.0]])   # backwards (S)
    keys, turn = effective_targets(poses)
    assert keys.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert turn.tolist() == [1, 1, 1, 2, 0, 1]
