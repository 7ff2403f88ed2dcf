"""--memory-budget: a probe picks the micro-batch; too small a budget is one error line naming the
smallest budget that works, before training starts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlx_clip.cli import main
from mlx_clip.errors import ConfigError
from mlx_clip.memory_budget import MARGIN, MemoryModel, choose_micro_batch, parse_size


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
    # That figure does work: the same run under it trains, with some micro-batch.
    ok = CliRunner().invoke(main, ["finetune", "--model", "tiny", "--memory-budget", smallest, "--steps", "2",
                                   "--no-evaluate", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert f"memory budget " in ok.output
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["micro_batch_size"] is None or 1 <= saved["micro_batch_size"] <= saved["batch_size"]
