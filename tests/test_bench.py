"""`mlxclip bench` and `mlxclip env`: the report files and the figures they rest on.

The FLOP count (the numerator of MFU) is held to torch's own `FlopCounterMode` on a transformers
CLIP, which counts every matmul, convolution and attention call it dispatches.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_clip.benchmarks.flops import forward_flops
from mlx_clip.cli import main
from tests.helpers import tiny_hf_clip


@pytest.mark.parametrize("text_length", [77, 13])
def test_forward_flops_equal_torch_flop_counter(text_length):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mlx_clip.model.config import CLIPConfig

    import transformers

    # Eager attention: torch's counter has no formula for the CPU sdpa kernel, and would skip it.
    config = CLIPConfig.from_dict(tiny_hf_clip(projection_dim=24).config.to_dict())
    model = transformers.CLIPModel._from_config(transformers.CLIPConfig.from_dict(config.to_dict()),
                                                attn_implementation="eager").eval()
    pixels = torch.zeros(1, 3, 32, 32)
    ids = torch.ones(1, text_length, dtype=torch.long)
    counted = {}
    for name, run in (("image", lambda: model.get_image_features(pixel_values=pixels)),
                      ("text", lambda: model.get_text_features(input_ids=ids))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        counted[name] = counter.get_total_flops()
    assert forward_flops(config, text_length) == counted


@pytest.fixture
def bench_out(tmp_path) -> Path:
    """Where the benchmark tests write their reports: CI points MLXCLIP_BENCH_OUT at
    benchmarks/results/ci, so the report it keeps is the one these tests checked (no second run)."""
    folder = os.environ.get("MLXCLIP_BENCH_OUT")
    if not folder:
        return tmp_path
    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.slow
def test_bench_tiny_writes_json_markdown_and_png(bench_out):
    from matplotlib.image import imread

    tmp_path = bench_out

    result = CliRunner().invoke(main, ["bench", "--size", "tiny", "--out", str(tmp_path), "--steps", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    names = [row["name"] for row in data["train"]]
    assert names[:3] == ["mlx fp32", "torch fp32", "torch amp_bf16"]
    for row in data["train"]:
        assert "error" not in row, row
        for key in ("images_per_s", "mfu", "loss", "peak_memory_bytes", "step_seconds"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key, row[key])
        assert row["mfu"] < 1  # a figure above the measured peak would be a counting error
    # Same weights, same data: every engine and peer reaches the same loss (float32 rounding apart).
    losses = np.array([row["loss"] for row in data["train"] if "fp32" in row["name"]])
    assert np.ptp(losses) / losses.mean() <= 1e-5
    for engine in ("mlx", "torch"):
        inference = data["inference"][engine]
        for key in ("images_per_s", "texts_per_s", "image_latency_ms", "text_latency_ms"):
            assert math.isfinite(inference[key]) and inference[key] > 0, (engine, key, inference[key])
    assert {"mlx_over_torch_images_per_s", "mlx_over_torch_lone_image"} <= set(data["ratios"])
    # The quantized rows hold fewer weight bytes than float32 (their exact count is test_quantize's);
    # the tiny model's float32 token embedding is most of it, so the ratio is near 1 here (0.97).
    for bits in (8, 4):
        row = data["inference"][f"mlx {bits}-bit"]
        assert row["images_per_s"] > 0 and row["text_latency_ms"] > 0, row
        assert 0 < data["ratios"][f"mlx_{bits}bit_over_fp32_weight_bytes"] < 1, data["ratios"]
        assert f"| MLX {bits}-bit / MLX float32: weight memory |" in (tmp_path / "results.md").read_text()
    assert "lone image, p50 ms" in (tmp_path / "results.md").read_text()
    assert data["data_pipeline"]["images_per_s"] > 0
    assert all(value is not None and value > 0 for value in data["ratios"].values())
    markdown = (tmp_path / "results.md").read_text()
    for name in names:
        assert f"| {name} |" in markdown
    image = imread(tmp_path / "results.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_env_reports_the_machine_as_numpy_detects_it():
    result = CliRunner().invoke(main, ["env", "--json", "--no-measure"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    for ours, numpy_name in (("avx2", "AVX2"), ("avx512f", "AVX512F"), ("fma", "FMA3")):
        assert (ours in data["cpu"]["flags"]) == bool(features.get(numpy_name)), ours
    assert data["versions"]["mlxclip"] and data["mlx_blas"]["name"]
    text = CliRunner().invoke(main, ["env", "--no-measure"]).output
    assert "MLX BLAS" in text and "engine    mlx" in text and "engine    torch" in text


@pytest.mark.slow
def test_serving_load_benchmark_tiny(bench_out):
    tmp_path = bench_out
    result = CliRunner().invoke(main, ["bench", "--serving", "--size", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "serving.json").read_text())
    seen = {(row["engine"], row["mode"], row["clients"]) for row in data["rows"]}
    assert seen == {(e, m, c) for e in ("mlx", "torch") for m in ("batched", "unbatched") for c in data["levels"]}
    for row in data["rows"]:
        assert row["failed"] == 0 and 0 < row["answered"] <= 64, row
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
        # Each client waits for its answer before sending again, so the rate is bounded by latency.
        assert row["requests_per_s"] <= row["clients"] / (row["p50_ms"] / 1000) * 2, row
    assert set(data["ratios"]) == {"mlx", "torch"}
    assert "| mlx | batched | 16 |" in (tmp_path / "serving.md").read_text()


def test_a_bfloat16_row_too_slow_for_the_cpu_is_skipped_with_its_estimate():
    """On a CPU without bfloat16 instructions torch's bfloat16 matmuls run several times slower than
    float32 (a 2-core AMD EPYC with AVX2: 12-19 GFLOP/s against 47), and a b32 step row would take
    most of ROW_SECONDS or more. Estimated from this run's
    own torch float32 step and the two matmul peaks, the row is skipped and the table says why."""
    from mlx_clip.benchmarks.suite import ROW_SECONDS, _too_slow

    fp32 = {"step_seconds": 10.0}
    reason = _too_slow("torch amp_bf16", fp32, {"float32": 100.0, "bfloat16": 1.25}, 5)
    assert reason == "bfloat16 matmuls run 80x slower than float32 on this CPU, so its 5 steps would take ~67 min"
    fast = {"float32": 100.0, "bfloat16": 100.0 * 10.0 * 5 / ROW_SECONDS}  # exactly at the limit: run it
    assert _too_slow("torch amp_bf16", fp32, fast, 5) is None
    assert _too_slow("torch fp32", fp32, {"float32": 100.0, "bfloat16": 0.1}, 5) is None
    assert _too_slow("torch amp_bf16", {"error": "x"}, {"float32": 100.0, "bfloat16": 0.1}, 5) is None


def test_inference_profile_covers_both_towers_and_engines():
    """`ops --inference`'s rows on the tiny model: every (engine, tower, batch) measured, torch's parts
    adding up to what its profiler saw, MLX's parts one per ablation, and the table naming each."""
    from mlx_clip.api import resolve
    from mlx_clip.benchmarks.forward_profile import MLX_PARTS, markdown, run

    rows = run(resolve("tiny"), batches=(1, 4), repeats=1)
    assert {(r["engine"], r["tower"], r["batch"]) for r in rows} == {
        (e, t, b) for e in ("mlx", "torch") for t in ("image", "text") for b in (1, 4)}
    for row in rows:
        assert row["total_ms"] > 0
        if row["engine"] == "torch":
            assert sum(row["parts_ms"].values()) == pytest.approx(row["profiled_ms"])
        else:
            assert set(row["parts_ms"]) == set(MLX_PARTS)
    table = markdown(rows)
    assert table.count("\n| image |") == 2 and table.count("\n| text |") == 2
