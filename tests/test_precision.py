"""Mixed precision (`--precision`, open_clip's names): float32 master weights and optimizer state,
low-precision compute, the loss in float32; exact resume; the MLX engine's CPU fallback.

Tolerances, per compute dtype, on the loss relative to float32's from the same weights and data.
A mixed-precision loss must differ from float32's (else `--precision` did nothing: the float32
runs are deterministic, so a run that ignored it would differ by exactly 0) and by no more than
low-precision rounding explains. Measured (this machine, CPU, 3 seeds): torch autocast, step 1:
bfloat16 8.6e-5 to 7.4e-4, float16 1.2e-5 to 4.4e-5; over 6 steps: bfloat16 up to 6.1e-3, float16
up to 9.5e-4. The MLX step: bfloat16 3.4e-4 to 3.7e-4, float16 1.7e-5 to 4.4e-5. Each bound is
about 10x the largest measured, each floor about 10x under the smallest. bfloat16 keeps 8 mantissa
bits (rounding 3.9e-3), float16 11 (4.9e-4): float16 gets bounds of its own.
"""

import warnings

import numpy as np
import pytest

from mlx_clip.errors import ConfigError
from mlx_clip.training.options import TrainConfig
from mlx_clip.training.trainer import Interrupted
from tests.train_helpers import assert_same_weights, final_weights, run, small_config

# (floor, bound) of |loss - float32 loss| / float32 loss: torch's first step, torch's six steps, MLX's step.
TORCH_STEP1 = {"amp_bf16": (1e-5, 1e-2), "amp_fp16": (1e-6, 5e-4)}
TORCH_STEPS = {"amp_bf16": 6e-2, "amp_fp16": 1e-2}
MLX_STEP = {"bfloat16": (3e-5, 4e-3), "float16": (1e-6, 5e-4)}


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_torch_mixed_precision_trains_close_to_float32_with_float32_master_weights(tmp_path, precision):
    fp32 = np.array(run(small_config(tmp_path / "fp32", "torch", steps=6, save_every=0)).train.losses)
    mixed = np.array(run(small_config(tmp_path / precision, "torch", steps=6, save_every=0,
                                      precision=precision)).train.losses)
    assert np.all(np.isfinite(mixed))
    rel = np.abs(mixed - fp32) / fp32
    floor, bound = TORCH_STEP1[precision]
    assert floor < rel[0] <= bound, rel  # the low-precision forward ran, and only rounding changed
    assert rel.max() <= TORCH_STEPS[precision], rel
    weights = final_weights(tmp_path / precision)
    assert all(w.dtype == np.float32 for w in weights.values())


def test_torch_mixed_precision_resumes_bit_identically(tmp_path):
    full = run(small_config(tmp_path / "full", "torch", precision="amp_bf16"))
    with pytest.raises(Interrupted):
        run(small_config(tmp_path / "cut", "torch", precision="amp_bf16"), stop_after=5)
    resumed = run(small_config(tmp_path / "cut", "torch", precision="amp_bf16", resume="latest"))
    assert resumed.train.losses == full.train.losses[5:]
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "full"))


def test_mlx_on_the_cpu_says_so_and_trains_in_float32(tmp_path):
    plain = run(small_config(tmp_path / "plain", "mlx", steps=4, save_every=0)).train.losses
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed = run(small_config(tmp_path / "amp", "mlx", steps=4, save_every=0, precision="amp_bf16")).train.losses
    assert any("trains in float32" in str(w.message) for w in caught)
    assert mixed == plain


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mlx_mixed_precision_step_keeps_float32_master_weights(dtype):
    """The GPU path (low-precision copies inside the differentiated function), run on the CPU."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_clip.api import resolve
    from mlx_clip.engine.protocol import load_backend
    from mlx_clip.mlx_backend.train import make_train_step
    from mlx_clip.engine.policy import training_plan

    cfg = TrainConfig(model="tiny", lr=1e-3)
    rng = np.random.default_rng(0)
    pixels = mx.array(rng.standard_normal((4, 32, 32, 3)).astype(np.float32))
    ids = mx.array(np.array([[49406, 320, 49407, 0]] * 4, dtype=np.int32))
    labels = mx.arange(4)
    losses = {}
    for name, compute in (("fp32", None), (dtype, getattr(mx, dtype))):
        engine = load_backend("mlx", resolve("tiny"))
        engine.prepare_training(cfg)
        module, optimizer = engine.training.module, engine.training.optimizer
        step = make_train_step(module, optimizer, cfg, training_plan(cfg), compute_dtype=compute)
        loss, norm, ok = step(pixels, ids, labels, mx.array(1e-3))
        mx.eval(loss, module.state, optimizer.state)
        assert bool(ok)
        assert all(p.dtype == mx.float32 for _, p in tree_flatten(module.parameters()))
        losses[name] = float(loss)
    floor, bound = MLX_STEP[dtype]
    assert floor < abs(losses[dtype] - losses["fp32"]) / losses["fp32"] <= bound, losses


@pytest.mark.parametrize("flags,message", [
    ({"precision": "fp8"}, "precision must be one of"),
    ({"precision": "bf16", "dtype": "float16"}, "give one of the two"),
    ({"precision": "amp_bf16", "dtype": "bfloat16"}, "float32 master weights"),
])
def test_bad_precision_is_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.resolve(None, flags)


def test_pure_precision_sets_the_parameter_dtype():
    assert TrainConfig.resolve(None, {"precision": "bf16"}).parameter_dtype == "bfloat16"
    assert TrainConfig.resolve(None, {"precision": "amp_fp16"}).autocast_dtype == "float16"
    assert TrainConfig.resolve(None, {}).autocast_dtype is None
