"""`--compile`: the torch engine's towers through torch.compile (Inductor), against eager.

The compiled forward and backward must give the eager run's losses and weights up to float32
rounding, keep the parameters' names (a checkpoint of a compiled run resumes without --compile),
and be refused where it would mean nothing (the MLX engine always compiles its step)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_clip.errors import ConfigError
from mlx_clip.finetune import Interrupted
from tests.train_helpers import final_weights, run, small_config

pytestmark = pytest.mark.slow


def test_compiled_steps_equal_eager_and_resume_without_it(tmp_path):
    """4 steps of tiny CLIP: compiled for the first 2 (stopped there, as Ctrl-C would), then resumed
    eagerly; against 4 eager steps. Inductor fuses the towers' pointwise work, which reorders float32
    arithmetic: losses relative 1e-5 (measured 6.4e-7); weights 4e-5 apart (measured 3.9e-6: Adam
    divides each gradient by its running size, so where a gradient is tiny its rounding moves the
    update by a share of lr = 2e-3)."""
    eager = run(small_config(tmp_path / "eager", "torch", steps=4, save_every=2))
    with pytest.raises(Interrupted):
        run(small_config(tmp_path / "compiled", "torch", steps=4, save_every=2, compile=True), stop_after=2)
    resumed = run(small_config(tmp_path / "compiled", "torch", steps=4, save_every=2, resume="latest"))
    records = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    compiled = {r["step"]: r["loss"] for r in records if "loss" in r}
    np.testing.assert_allclose([compiled[1], compiled[2], *resumed.train.losses], eager.train.losses, rtol=1e-5)
    reference, got = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert reference.keys() == got.keys()
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], rtol=0, atol=4e-5, err_msg=name)


def test_the_mlx_engine_refuses_it():
    with pytest.raises(ConfigError, match=r"--compile\) is for the torch engine; the mlx engine always compiles"):
        small_config("unused", "mlx", compile=True)
