"""--memory-budget: a probe picks the micro-batch; too small a budget is one error line naming the
smallest budget that works, before training starts. The reference is the engine's own measured peak
memory in a real run (MLX's allocator peak, `peak_bytes` in metrics.jsonl), not our formula."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_clip.cli import main
from mlx_clip.errors import ConfigError
from mlx_clip.training.memory_budget import MARGIN, MemoryModel, choose_micro_batch, parse_size


def test_sizes_parse():
    assert parse_size("8GB") == 8 * 10 ** 9 and parse_size("512MiB") == 512 * 2 ** 20 and parse_size("1.5g") == 1.5e9
    for bad in ("eight", "-1GB", "3 parsecs", "0"):
        with pytest.raises(ConfigError, match="expected a size such as 8GB"):
            parse_size(bad)


def test_choice_is_the_largest_that_fits():
    model = MemoryModel(fixed=1e9, per_pair=1e7)
    budget = 3e9
    micro = choose_micro_batch(model, budget, batch=1024, dim=512)
    assert model.need(micro, 1024, 512) <= budget * MARGIN < model.need(micro + 1, 1024, 512)
    assert choose_micro_batch(model, 1e12, batch=64, dim=512) == 64  # everything fits: no caching


def test_too_small_budget_fails_in_one_line_through_the_cli(tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--model", "tiny", "--memory-budget", "1MB", "--steps", "2",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the smallest budget that works is" in errors[0], result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training started
    smallest = errors[0].rsplit("the smallest budget that works is ", 1)[1].replace(" ", "")
    # That figure does work: the same run under it trains, and its measured peak stays under it.
    ok = _finetune("--model", "tiny", "--memory-budget", smallest, "--steps", "2", "--no-evaluate",
                   "--out", str(tmp_path / "ok"))
    assert "memory budget " in ok
    assert _measured_peak(tmp_path / "ok") <= parse_size(smallest)


def _finetune(*args: str) -> str:
    """`mlxclip finetune ARGS` in a fresh process, whose peak memory is the run's alone (the engine
    reports the process's peak); its output."""
    done = subprocess.run([sys.executable, "-m", "mlx_clip", "finetune", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _measured_peak(run) -> int:
    """The largest peak memory the engine reported in a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_bytes"] for r in records if "peak_bytes" in r)


def _long_captions(folder, count: int):
    """`count` 32x32 images with captions longer than the tiny model's 77 tokens, so a real run holds
    the tensors of the probe's full-length texts."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    words = "a red blue green small large circle square photo of the on in left right top".split()
    lines = ["image,caption"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png," + " ".join(rng.choice(words, size=100)))
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder / "captions.csv"


def test_the_chosen_micro_batch_keeps_a_real_run_within_the_budget(tmp_path):
    """MLX engine, tiny model, batch 128 of full-length captions (the probe's worst case, so probe
    and run hold tensors of the same shapes), a 125 MB budget. Every figure is the engine's measured
    peak in a real run. Measured here (MLX CPU, since the last layer computes only the pooled rows):
    the whole batch 137.5-138.8 MB, over the budget, so a micro-batch must exist; the budget chose
    39-40 pairs and said it expected 102.7-103.5 MB, and the run then peaked at 102.7-103.5 MB
    (differences under 0.01% over four runs; before that change, at a 200 MB budget, up to 2.5%).
    The bound is the budget's own `MARGIN` (15%), 6x the largest difference seen; the former probe
    (both sizes in one process) chose 13 pairs and expected 165 MB for a run that peaked at 91 MB."""
    budget, batch = 125 * 10 ** 6, 128
    data = _long_captions(tmp_path / "data", 160)
    common = ("--model", "tiny", "--data", str(data), "--batch-size", str(batch), "--steps", "2", "--warmup-steps", "0",
              "--no-evaluate", "--num-workers", "1", "--log-every", "1")
    _finetune(*common, "--out", str(tmp_path / "whole"))
    assert _measured_peak(tmp_path / "whole") > budget  # the whole batch does not fit: caching is needed
    out = tmp_path / "run"
    output = _finetune(*common, "--memory-budget", "125MB", "--out", str(out))
    micro = json.loads((out / "config.json").read_text())["micro_batch_size"]
    assert isinstance(micro, int) and 1 <= micro < batch
    assert f"micro-batch {micro} (feature caching)" in output
    expected = parse_size(output.split("expected peak ", 1)[1].split(" (", 1)[0].replace(" ", ""))
    measured = _measured_peak(out)
    print(f"whole batch {_measured_peak(tmp_path / 'whole') / 1e6:.2f} MB; micro {micro}: expected "
          f"{expected / 1e6:.2f} MB, measured {measured / 1e6:.2f} MB")
    assert measured <= budget  # the promise (the margin is for what a probe cannot see)
    assert abs(measured - expected) <= (1 - MARGIN) * measured
