"""--resolution-schedule: the image size changes at the given steps, in both engines, the MLX step
compiling once per size; a run resumes exactly across a switch; each step trains at its size with
the position embeddings interpolated as transformers' interpolate_pos_encoding does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_clip.errors import ConfigError
from mlx_clip.training.schedule import parse_resolution_schedule, resolution_at
from mlx_clip.training.trainer import Interrupted
from tests.train_helpers import assert_same_weights, final_weights, run, small_config

SCHEDULE = "0:16,3:32"  # the tiny model is 32 px with 8 px patches


def test_parse_and_lookup():
    schedule = parse_resolution_schedule("0:160, 2000:224")
    assert schedule == [(0, 160), (2000, 224)]
    assert [resolution_at(schedule, s) for s in (0, 1999, 2000, 5000)] == [160, 160, 224, 224]
    for bad in ("160,224", "5:160", "0:160,0:224", "0:abc"):
        with pytest.raises(ConfigError, match="--resolution-schedule"):
            parse_resolution_schedule(bad)


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_sizes_follow_the_schedule_and_resume_exactly(tmp_path, engine):
    common = dict(steps=6, save_every=2, resolution_schedule=SCHEDULE)
    whole = run(small_config(tmp_path / "whole", engine, **common))
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in records if "loss" in r] == [16, 16, 16, 32, 32, 32]
    for stop in (2, 4):  # before and after the switch at step 3
        out = tmp_path / f"cut{stop}"
        with pytest.raises(Interrupted):
            run(small_config(out, engine, **common), stop_after=stop)
        resumed = run(small_config(out, engine, resume="latest", **common))
        assert resumed.train.losses == whole.train.losses[stop:]
        assert_same_weights(final_weights(tmp_path / "whole"), final_weights(out))
    # final/ is the model at its own size: the schedule trained it through interpolation.
    assert json.loads((tmp_path / "whole" / "final" / "config.json").read_text())["vision_config"]["image_size"] == 32


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_a_scheduled_step_is_the_interpolated_model(tmp_path, engine):
    """At step 1 nothing has trained yet, so a 16 px step through on-the-fly interpolation sees the
    same model as --image-size 16 (positions resampled once): the same loss within 1e-5."""
    scheduled = run(small_config(tmp_path / "a", engine, steps=1, save_every=0, resolution_schedule="0:16"))
    resized = run(small_config(tmp_path / "b", engine, steps=1, save_every=0, image_size=16))
    np.testing.assert_allclose(scheduled.train.losses[0], resized.train.losses[0], rtol=1e-5)


def test_sizes_must_fit_the_patches(tmp_path):
    with pytest.raises(ConfigError, match=r"sizes \[20\] are not multiples of the model's patch size 8"):
        run(small_config(tmp_path / "x", "mlx", steps=2, resolution_schedule="0:20"))
