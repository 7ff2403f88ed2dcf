"""--no-multi-positive: only each (image, caption) pair is a positive, as in CLIP's one-hot loss."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_clip.data.loader import Batch
from tests.train_helpers import run, small_config


def test_positive_ids_follow_the_switch():
    labels = np.array([0, 0, 1, 1], dtype=np.int64)
    batch = Batch(np.zeros((4, 2, 2, 3), np.float32), np.zeros((4, 8), np.int64), labels,
                  np.arange(4), np.arange(4))
    assert batch.positive_ids.tolist() == [0, 0, 1, 1]
    batch.multi_positive = False
    assert batch.positive_ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_the_switch_reaches_the_loss(tmp_path, engine):
    """The demo's class folders put several samples of one class in a batch of 8, so treating
    them as negatives (one-hot targets) must give another first-step loss."""
    losses = {}
    for flag in (True, False):
        result = run(small_config(tmp_path / str(flag), engine, steps=1, save_every=0, multi_positive=flag))
        losses[flag] = result.train.losses[0]
    assert losses[True] != pytest.approx(losses[False], rel=1e-4), losses
