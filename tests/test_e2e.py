"""End to end on the built-in domains, as a user runs it: the README's default fine-tuning, then
evaluation against the base model, forgetting on the control domain, and a WiSE-FT sweep."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlx_clip.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`mlxclip finetune --backend mlx` with no other argument but the output folder."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "mlx_clip", "finetune", "--backend", "mlx", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    return out, evals[0]["eval"], evals[-1]["eval"], proc.stdout


def test_demo_goes_from_chance_to_at_least_90_percent(demo_run):
    _, before, after, stdout = demo_run
    assert before["val_zero_shot_top1"] < 0.25  # 12 classes: chance is 0.083
    assert after["val_zero_shot_top1"] >= 0.90
    assert "val_zero_shot_top1" in stdout and "before" in stdout  # the table the user reads


def test_eval_compare_reports_target_gain_and_control_change(demo_run, tmp_path):
    from mlx_clip.model.builtin import cache_root

    run, _, _, _ = demo_run
    demo = cache_root() / "demo"
    result = CliRunner().invoke(main, ["eval", "--compare", "small", str(run / "final"),
                                       "--data", str(demo / "target" / "val"), "--control",
                                       str(demo / "control" / "val"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    tables = {p.name: json.loads(p.read_text()) for p in (tmp_path / "report").glob("*.json")}
    target = next(t for name, t in tables.items() if "delta" in t and t["base"].get("role") == "target")
    control = next(t for name, t in tables.items() if "delta" in t and t["base"].get("role") == "control")
    assert target["delta"]["acc1"] >= 0.5  # the domain gain
    assert "acc1" in control["delta"]  # forgetting is reported beside it
    assert "acc1" in result.output


def test_wise_ft_sweep_runs_from_base_to_fine_tuned(demo_run, tmp_path):
    from mlx_clip.model.builtin import cache_root

    run, _, _, _ = demo_run
    demo = cache_root() / "demo"
    result = CliRunner().invoke(main, ["wise-ft", "--zero-shot", "small", "--fine-tuned", str(run / "final"),
                                       "--sweep", "0:1:0.5", "--eval-target", str(demo / "target" / "val"),
                                       "--eval-control", str(demo / "control" / "val"),
                                       "--control-floor", "0.0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    curve = json.loads((tmp_path / "wise_ft.json").read_text())
    points = {p["alpha"]: p for p in curve["points"]}
    assert sorted(points) == [0.0, 0.5, 1.0]
    assert (tmp_path / "wise_ft.png").stat().st_size > 0
    target = [points[a]["target"]["acc1"] for a in (0.0, 0.5, 1.0)]
    assert target[0] < 0.25 and target[2] >= 0.9  # alpha 0 is the base model, alpha 1 the fine-tuned one
    # A floor of 0 admits every alpha, so the best is the highest target score (ties: smaller alpha).
    assert curve["best_alpha"] == min(points, key=lambda a: (-points[a]["target"]["acc1"], a))
