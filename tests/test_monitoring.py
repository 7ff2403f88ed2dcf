"""Runs a person can watch: TensorBoard curves that survive a resume without duplicated or missing
steps (read back with tensorboard's own event reader), `mlxclip report`, plain progress lines off
a terminal, a failing log that never stops training, and --keep-best."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_clip.training.monitor as monitor
from mlx_clip.cli import main
from tests.train_helpers import run, small_config


def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), purge_orphaned_data=True)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_curves_continue_across_a_resume(tmp_path):
    out = tmp_path / "run"
    first = run(small_config(out, "mlx", steps=6, save_every=4, keep_checkpoints=3, tensorboard=True))
    # Resume from step 4 although the run logged up to 6: steps 5 and 6 are logged again, and the
    # earlier copies must go from the curves and from metrics.jsonl.
    resumed = run(small_config(out, "mlx", steps=10, save_every=4, keep_checkpoints=3, tensorboard=True,
                               resume=str(out / "checkpoints" / "step-0000004")))
    loss = _scalars(out / "tensorboard", "train/loss")
    assert [s for s, _ in loss] == list(range(1, 11))
    np.testing.assert_allclose([v for s, v in loss if s <= 4], first.train.losses[:4], rtol=1e-6)
    np.testing.assert_allclose([v for s, v in loss if s > 4], resumed.train.losses, rtol=1e-6)
    for tag in ("train/lr", "train/logit_scale", "train/grad_norm", "train/images_per_s", "train/peak_bytes"):
        assert [s for s, _ in _scalars(out / "tensorboard", tag)] == list(range(1, 11)), tag
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 11))


def test_evaluations_reach_tensorboard_and_report(tmp_path):
    out = tmp_path / "run"
    run(small_config(out, "mlx", steps=6, eval_every=3, tensorboard=True, keep_best="acc1"), evaluate=True)
    top1 = _scalars(out / "tensorboard", "eval/val_zero_shot_top1")
    assert [s for s, _ in top1] == [0, 3, 6]

    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    report = out / "report"
    for png in ("training.png", "evaluation.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["data"]["train_samples"] > 0
    final = dict(top1)[6]
    row = re.search(r"\| val_zero_shot_top1 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \((\d+)\) \|", text)
    assert row, text
    assert float(row.group(1)) == pytest.approx(dict(top1)[0], abs=5e-5)
    assert float(row.group(2)) == pytest.approx(final, abs=5e-5)
    best_value, best_step = max((v, s) for s, v in top1)
    assert float(row.group(3)) == pytest.approx(best_value, abs=5e-5) and int(row.group(4)) == best_step
    # --keep-best acc1: the best evaluation after training started, as a loadable model folder.
    kept = json.loads((out / "best" / "best.json").read_text())
    trained = [(v, s) for s, v in top1 if s > 0]
    assert kept["metric"] == "val_zero_shot_top1"
    assert kept["value"] == pytest.approx(max(trained)[0], abs=1e-6)
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "config.json").is_file()


def test_keep_best_names_an_unknown_metric(tmp_path):
    from mlx_clip.errors import ConfigError

    with pytest.raises(ConfigError, match="--keep-best nonsense: this run's evaluations have no such metric"):
        run(small_config(tmp_path / "run", "mlx", steps=2, eval_every=1, keep_best="nonsense"), evaluate=True)


def test_progress_is_plain_lines_off_a_terminal(tmp_path, capsys):
    run(small_config(tmp_path / "run", "mlx", steps=3), progress="lines")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(re.search(r"loss [0-9.]+ lr [0-9.e-]+", line) for line in lines), lines


def test_a_failing_metrics_log_is_reported_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    real_open = open

    def full_disk(path, *args, **kwargs):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(monitor, "open", full_disk, raising=False)
    result = run(small_config(tmp_path / "run", "mlx", steps=4))
    assert result.train.steps == 4 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: cannot write {tmp_path / 'run' / 'metrics.jsonl'} (No space left on device); "
                        "training goes on without it"]


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder (no metrics.jsonl" in result.output


def test_two_writers_in_one_second_keep_both_event_files(tmp_path):
    """tensorboardX names event files by the second: a writer opened right after another (the
    final evaluation after training) must not truncate the first one's curves."""
    for step in (1, 2):
        log = monitor.RunLog(tmp_path, tensorboard=True)
        log.write({"step": step, "loss": float(step)})
        log.close()
    assert [s for s, _ in _scalars(tmp_path / "tensorboard", "train/loss")] == [1, 2]
