"""The evaluators' one training loop: every net trains through ``fit`` with its row of ``FITS``,
deterministically (two runs write the same bytes)."""
import argparse
import hashlib
import json

import torch

from streamgen.eval import train_evaluators as T


def _run(out):
    T.train(argparse.Namespace(out=str(out), train_clips=4, test_clips=2, epochs=1, threads=1))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_every_evaluator_trains_through_fit_deterministically(tmp_path, monkeypatch):
    calls = []
    real = T.fit

    def spy(net, n, loss_of, cfg, epochs, permute):
        calls.append((type(net).__name__, cfg))
        return real(net, n, loss_of, cfg, epochs, permute)
    monkeypatch.setattr(T, "fit", spy)
    threads = torch.get_num_threads()
    try:
        a = _run(tmp_path / "a")
        b = _run(tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    assert [c[0] for c in calls[:3]] == ["InverseDynamics", "VideoEncoder", "ThemeClassifier"]
    assert [c[1] for c in calls[:3]] == [T.FITS["idm"], T.FITS["encoder"], T.FITS["theme"]]
    assert a == b and set(a) == {"idm.safetensors", "encoder.safetensors", "theme.safetensors"}
    info = json.loads((tmp_path / "a" / "evaluators.json").read_text())
    assert set(info["nets"]) == {"idm", "encoder", "theme"}


def test_fit_follows_its_schedule():
    net = torch.nn.Linear(2, 1)
    seen = []
    cfg = T.Fit(lr=0.1, batch=3, max_lr=0.2, epoch_scale=2)

    def loss_of(j):
        seen.append(list(j))
        return net(torch.ones(len(j), 2)).square().mean()
    T.fit(net, 7, loss_of, cfg, epochs=1, permute=lambda n: list(range(n)))
    assert seen == [[0, 1, 2], [3, 4, 5], [6]] * 2 and not net.training
