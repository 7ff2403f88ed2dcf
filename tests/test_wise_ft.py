"""WiSE-FT weight interpolation and sweep.

Reference: mlfoundations/wise-ft `src/wise_ft.py` `_merge`, applied here to torch tensors as it is
written there: `(1 - alpha) * theta_0[key] + alpha * theta_1[key]`. Output folders are read back
with `transformers.CLIPModel.from_pretrained` and `safetensors.torch.load_file` (bf16 natively).
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import json
import shutil

import numpy as np
import pytest
import torch

from mlx_clip.errors import CheckpointError, ConfigError, DataError
from mlx_clip.evaluation.evaluate import evaluate
from mlx_clip.robust.wise_ft import interpolate_weights, parse_sweep, wise_ft, wise_ft_sweep
from tests.helpers import TINY_TEXT, TINY_VISION, hf_clip, save_hf
from tests.test_evaluate import TEMPLATES, perturbed_copy, small_demo, tiny_model_folder


def merge_reference(theta_0: dict, theta_1: dict, alpha: float) -> dict:
    """mlfoundations/wise-ft's `_merge` without Fisher weighting, on torch tensors."""
    return {key: (1 - alpha) * theta_0[key] + alpha * theta_1[key] for key in theta_0.keys()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wise")
    zero_shot = tiny_model_folder(root / "zero_shot")
    return {"root": root, "zero_shot": zero_shot, "fine_tuned": perturbed_copy(zero_shot, root / "fine_tuned")}


def _state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# --- parse_sweep --------------------------------------------------------------------------------


def test_parse_sweep_is_inclusive_and_floating_point_safe():
    assert parse_sweep("0:1:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_sweep("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_sweep("0.2:0.8:0.3") == [0.2, 0.5, 0.8]
    assert parse_sweep("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]  # stop not reached: not added
    assert parse_sweep(" 0 : 0.02 : 0.01 ") == [0.0, 0.01, 0.02]
    assert parse_sweep("1,0,0.5") == [0.0, 0.5, 1.0]
    assert parse_sweep("0.7") == [0.7]
    assert len(parse_sweep("0:1:0.001")) == 1001


@pytest.mark.parametrize("spec, match", [
    ("", "start:stop:step"), ("0:1", "expected start:stop:step"), ("0:1:0.1:2", "expected start:stop:step"),
    ("0:1:0", "step must be > 0"), ("0:1:-0.1", "step must be > 0"), ("1:0:0.1", "below start"),
    ("a:1:0.1", "'a' is not a number"), ("nan:1:0.1", "not a finite number"), ("0:2:0.5", "outside"),
    ("0,0.5,0.5", "repeated"), ("-0.1,1", "outside"), ("0:1:0.0001", "at most 1001"),
])
def test_parse_sweep_rejects_bad_strings(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_sweep(spec)


# --- interpolate_weights ------------------------------------------------------------------------


def _weights(rng, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"a.weight": rng.normal(size=(64, 32)).astype(dtype), "a.bias": rng.normal(size=32).astype(dtype),
            "logit_scale": np.asarray(rng.normal(), dtype), "position_ids": np.arange(7, dtype=np.int64)}


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.9])
def test_interpolation_equals_the_wise_ft_formula_bit_for_bit(rng, alpha):
    theta_0, theta_1 = _weights(rng), _weights(rng)
    got = interpolate_weights(theta_0, theta_1, alpha)
    ref = merge_reference({k: torch.from_numpy(v) for k, v in theta_0.items() if v.dtype == np.float32},
                          {k: torch.from_numpy(v) for k, v in theta_1.items() if v.dtype == np.float32}, alpha)
    for name, tensor in ref.items():
        assert got[name].dtype == np.float32 and got[name].shape == theta_0[name].shape
        np.testing.assert_array_equal(got[name], tensor.numpy())
    np.testing.assert_array_equal(got["position_ids"], np.arange(7))


def test_alpha_endpoints_are_exact_and_half_is_the_midpoint(rng):
    theta_0, theta_1 = _weights(rng), _weights(rng)
    theta_0["a.bias"][0] = -0.0  # a signed zero survives too
    at0, at1, mid = (interpolate_weights(theta_0, theta_1, a) for a in (0.0, 1.0, 0.5))
    for name in theta_0:
        assert at0[name].tobytes() == theta_0[name].tobytes()
        assert at1[name].tobytes() == theta_1[name].tobytes()
        assert at0[name] is not theta_0[name]  # copies: editing the result leaves the input alone
    for name in ("a.weight", "a.bias", "logit_scale"):
        # 0.5 * x is exact in binary floating point, so the sum is the correctly rounded midpoint.
        expected = ((theta_0[name].astype(np.float64) + theta_1[name]) / 2).astype(np.float32)
        np.testing.assert_array_equal(mid[name], expected)


def test_float16_is_computed_in_float32_and_stays_float16(rng):
    theta_0, theta_1 = _weights(rng, np.float16), _weights(rng, np.float16)
    got = interpolate_weights(theta_0, theta_1, 0.3)
    exact = 0.7 * theta_0["a.weight"].astype(np.float64) + 0.3 * theta_1["a.weight"].astype(np.float64)
    assert got["a.weight"].dtype == np.float16
    ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert (np.abs(got["a.weight"] - exact) <= ulp).all()  # one rounding: within 1 fp16 ulp


def test_mismatched_checkpoints_raise_checkpoint_error_naming_the_tensor(rng):
    theta_0, theta_1 = _weights(rng), _weights(rng)
    with pytest.raises(CheckpointError, match="tensor a.bias is missing from the fine-tuned"):
        interpolate_weights(theta_0, {k: v for k, v in theta_1.items() if k != "a.bias"}, 0.5)
    with pytest.raises(CheckpointError, match="tensor extra.weight is missing from the zero-shot"):
        interpolate_weights(theta_0, {**theta_1, "extra.weight": np.zeros(3, np.float32)}, 0.5)
    with pytest.raises(CheckpointError, match=r"tensor a.weight has shape \(64, 32\) .* \(32, 64\)"):
        interpolate_weights(theta_0, {**theta_1, "a.weight": theta_1["a.weight"].T.copy()}, 0.5)
    with pytest.raises(CheckpointError, match="tensor position_ids .* differs"):
        interpolate_weights(theta_0, {**theta_1, "position_ids": np.arange(1, 8)}, 0.5)
    for alpha in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ConfigError, match="alpha must be a number in"):
            interpolate_weights(theta_0, theta_1, alpha)


# --- wise_ft folders ----------------------------------------------------------------------------


def test_wise_ft_writes_a_folder_transformers_loads_with_the_interpolated_weights(models, tmp_path):
    import transformers

    out = wise_ft(models["zero_shot"], models["fine_tuned"], 0.25, tmp_path / "mixed")
    expected = merge_reference(_state(models["zero_shot"]), _state(models["fine_tuned"]), 0.25)
    loaded = transformers.CLIPModel.from_pretrained(out).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (models["fine_tuned"] / name).read_bytes()

    at0 = wise_ft(models["zero_shot"], models["fine_tuned"], 0.0, tmp_path / "at0")
    for name, tensor in _state(models["zero_shot"]).items():
        assert torch.equal(_state(at0)[name], tensor)


def test_wise_ft_keeps_bf16_and_refuses_bad_outputs_and_other_architectures(models, tmp_path):
    from mlx_clip.convert import read_checkpoint, write_checkpoint
    from mlx_clip.convert.writer import copy_side_files

    tuned = read_checkpoint(models["fine_tuned"])
    bf16 = write_checkpoint(tmp_path / "bf16", tuned.config, tuned.tensors, to="hf", dtype="bfloat16")
    copy_side_files(models["fine_tuned"], bf16)
    out = wise_ft(models["zero_shot"], bf16, 0.5, tmp_path / "mixed")
    got, theta_1 = _state(out), _state(bf16)
    expected = merge_reference(_state(models["zero_shot"]), {k: v.float() for k, v in theta_1.items()}, 0.5)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name], tensor.to(torch.bfloat16), rtol=0, atol=0)

    with pytest.raises(ConfigError, match="is not empty"):
        wise_ft(models["zero_shot"], bf16, 0.5, tmp_path / "mixed")
    with pytest.raises(ConfigError, match="is an input checkpoint"):
        wise_ft(models["zero_shot"], bf16, 0.5, bf16, overwrite=True)
    other = save_hf(hf_clip(0, TINY_TEXT, {**TINY_VISION, "patch_size": 16}, projection_dim=16), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"different architectures \(vision_config.patch_size 8 vs 16\)"):
        wise_ft(models["zero_shot"], other, 0.5, tmp_path / "never")


# --- the sweep ----------------------------------------------------------------------------------


def test_sweep_measures_each_alpha_and_writes_the_curve(models, tmp_path):
    demo = small_demo(tmp_path / "demo")
    direct = {which: evaluate(models[which], demo["target_val"], control=demo["control_val"], templates=TEMPLATES)
              for which in ("zero_shot", "fine_tuned")}
    floor = direct["zero_shot"][1]["metrics"]["acc1"]  # control accuracy of the zero-shot model
    report = wise_ft_sweep(models["zero_shot"], models["fine_tuned"], "0:1:0.5", demo["target_val"],
                           demo["control_val"], backend="mlx", out_json=tmp_path / "wise.json",
                           control_floor=floor, templates=TEMPLATES)
    saved = json.loads((tmp_path / "wise.json").read_text())
    assert [p["alpha"] for p in saved["points"]] == [0.0, 0.5, 1.0]
    # The end points are measurements of the two models themselves.
    for alpha, which in ((0.0, "zero_shot"), (1.0, "fine_tuned")):
        point = next(p for p in saved["points"] if p["alpha"] == alpha)
        assert point["target"] == direct[which][0]["metrics"]
        assert point["control"] == direct[which][1]["metrics"]
    # The documented rule, applied to the measured points: the best target score among alphas
    # whose control score meets the floor (alpha 0 always does here), ties to the smaller alpha.
    meeting = [p for p in saved["points"] if p["control"]["acc1"] >= floor]
    assert meeting and meeting[0]["alpha"] == 0.0
    expected = min(meeting, key=lambda p: (-p["target"]["acc1"], p["alpha"]))["alpha"]
    assert report.best_alpha == expected
    best = next(p for p in saved["points"] if p["alpha"] == report.best_alpha)
    assert best["control"]["acc1"] >= floor and saved["best_alpha"] == report.best_alpha
    assert report.files.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "WiSE-FT" in report.files.markdown.read_text()


def test_sweep_refuses_captions_data_and_bad_floors(models, tmp_path):
    demo = small_demo(tmp_path / "demo")
    with pytest.raises(DataError, match="zeroshot_classification needs class folders"):
        wise_ft_sweep(models["zero_shot"], models["fine_tuned"], [0.0, 1.0], demo["captions_val"],
                      demo["control_val"], out_json=tmp_path / "w.json")
    with pytest.raises(ConfigError, match="control_floor must be a score"):
        wise_ft_sweep(models["zero_shot"], models["fine_tuned"], [0.0, 1.0], demo["target_val"],
                      demo["control_val"], out_json=tmp_path / "w.json", control_floor=1.5)


def test_sweep_on_domains_of_few_classes_keeps_top5_not_applicable(models, tmp_path):
    """With 5 classes or fewer, top-5 is not applicable (None): the sweep averages the rest and
    keeps it None, where it used to fail on np.mean over None."""
    demo = small_demo(tmp_path / "demo")
    few = tmp_path / "few"
    for name in sorted(p.name for p in demo["target_val"].iterdir())[:3]:
        shutil.copytree(demo["target_val"] / name, few / name)
    report = wise_ft_sweep(models["zero_shot"], models["fine_tuned"], [0.0, 1.0], few, demo["control_val"],
                           backend="mlx", out_json=tmp_path / "wise.json", templates=TEMPLATES)
    saved = json.loads((tmp_path / "wise.json").read_text())
    direct = evaluate(models["fine_tuned"], few, templates=TEMPLATES)[0]["metrics"]
    last = saved["points"][-1]["target"]
    assert last["acc5"] is None and direct["acc5"] is None
    assert last["acc1"] == direct["acc1"] and report.best_alpha in (0.0, 1.0)
