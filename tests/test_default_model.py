"""The shipped default model: it loads by name and by path, streams real frames, and its files
are within the size limit."""
import os
import shutil

import numpy as np
import pytest
import torch

from streamgen.errors import ConfigError
from streamgen.engine.pipeline import SHIPPED, Pipeline

ROOT = SHIPPED["default"]
ACTIONS = [{"keys": ["W"], "mouse": [0.0, 0.0]}, {"keys": [], "mouse": [0.5, 0.0]}, {"keys": ["A"], "mouse": [0.0, 0.0]}]


def frames_of(pipe, n_chunks=3, seed=3, start=None):
    s = pipe.session("a stone dungeon corridor lit by torches", seed=seed, start=start)
    return np.concatenate([s.step(ACTIONS[i % len(ACTIONS)]) for i in range(n_chunks)])


def test_files_and_card():
    for name in ("config.json", "model.safetensors", "autoencoder.safetensors", "teacher.safetensors", "MODEL_CARD.md"):
        assert os.path.isfile(os.path.join(ROOT, name)), name
    for name in ("model.safetensors", "autoencoder.safetensors", "teacher.safetensors"):
        assert os.path.getsize(os.path.join(ROOT, name)) <= 16 * 2**20


def test_default_streams_trained_frames():
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained("default")
    assert pipe.trained
    d = pipe.describe()
    f = frames_of(pipe)
    k = d["chunk_frames"]
    assert f.dtype == np.uint8 and f.shape == (3 * k, d["height"], d["width"], 3)
    # a decoded picture, not noise or a flat colour: some contrast, and neighbouring frames alike.
    # (Release 3 is blurrier than release 2: std 6.5-8.5 here, see its model card; a flat
    # colour is < 2.)
    assert f.std() > 4
    assert np.abs(f[1:].astype(int) - f[:-1]).mean() < np.abs(f.astype(int) - f[::-1]).mean() + 40
    assert (frames_of(pipe) == f).all(), "same seed and actions must give the same frames"
    w = frames_of(pipe, start="world")                 # the world model's usual opening
    assert w.shape == f.shape and w.std() > 4 and not (w == f).all()


def test_model_file_path_uses_its_autoencoder(tmp_path):
    torch.set_num_threads(1)
    by_name = frames_of(Pipeline.from_pretrained("default"), 2)
    by_file = frames_of(Pipeline.from_pretrained(os.path.join(ROOT, "model.safetensors")), 2)
    by_dir = frames_of(Pipeline.from_pretrained(ROOT), 2)
    assert (by_name == by_file).all() and (by_name == by_dir).all()
    # the model file alone cannot decode: a clear error, not a random autoencoder
    shutil.copy(os.path.join(ROOT, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="autoencoder"):
        Pipeline.from_pretrained(str(tmp_path / "model.safetensors"))
    ok = Pipeline.from_pretrained(str(tmp_path / "model.safetensors"),
                                  vae_path=os.path.join(ROOT, "autoencoder.safetensors"))
    assert (frames_of(ok, 2) == by_name).all()
