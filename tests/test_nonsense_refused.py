"""Fine-tuning input that used to run silently to a meaningless result is refused, or said to be
weak, with the value and the rule (issue 20): a resume on other data or options, a batch of one
pair, a warmup longer than the run, one class, a held-out split too small to mean anything."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from mlx_clip.cli import main
from mlx_clip.data.demo import make_demo
from tests.test_no_lost_work import assert_refused

BASE = ["--model", "tiny", "--batch-size", "8", "--warmup-steps", "1", "--num-workers", "0", "--no-evaluate",
        "--log-every", "1", "--save-every", "2"]


def finetune(*args):
    return CliRunner().invoke(main, ["finetune", *BASE, *[str(a) for a in args]])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("nonsense") / "demo", image_size=16, per_class_train=2, per_class_val=2,
                     per_class_control=1)


def captions_copy(demo, folder, *, edit=lambda rows: rows, limit=None):
    """The demo's held-out captions as a captions file of the user's, optionally edited."""
    folder.mkdir()
    with open(demo["captions_val"], newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    for row in rows:
        name = row["image"].replace("/", "_")
        shutil.copy(demo["captions_val"].parent / row["image"], folder / name)
        row["image"] = name
    rows = edit(rows)
    with open(folder / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "captions.csv"


def interrupted_run(out, data, *extra):
    """A run of 6 steps stopped after its checkpoint at step 2 (by --steps 2; resumed to 6)."""
    first = finetune("--data", data, "--steps", "2", "--val-fraction", "0", "--out", out, *extra)
    assert first.exit_code == 0, first.output
    return out


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_resume_on_other_captions_of_the_same_count_is_refused(demo, tmp_path, engine):
    data = captions_copy(demo, tmp_path / "data")
    other = captions_copy(demo, tmp_path / "other", edit=lambda rows: [{**r, "caption": r["caption"] + " again"}
                                                                       for r in rows])
    out = interrupted_run(tmp_path / "run", data, "--backend", engine)
    refused = finetune("--data", other, "--steps", "4", "--val-fraction", "0", "--out", out, "--resume", "latest",
                       "--backend", engine)
    assert_refused(refused, "the data are not the ones the run was trained on", "training captions differ")
    # The same data moved elsewhere still resume: image paths are compared relative to the data.
    moved = tmp_path / "moved"
    shutil.copytree(data.parent, moved)
    resumed = finetune("--data", moved / "captions.csv", "--steps", "4", "--val-fraction", "0", "--out", out,
                       "--resume", "latest", "--backend", engine)
    assert resumed.exit_code == 0, resumed.output


def test_resume_on_another_split_or_sample_count_is_refused(demo, tmp_path):
    data = captions_copy(demo, tmp_path / "data")
    out = interrupted_run(tmp_path / "run", data)
    split = finetune("--data", data, "--steps", "4", "--val-fraction", "0.25", "--out", out, "--resume", "latest")
    assert_refused(split, "val_fraction: checkpoint 0.0, now 0.25")
    fewer = captions_copy(demo, tmp_path / "fewer", limit=20)
    counted = finetune("--data", fewer, "--steps", "4", "--val-fraction", "0", "--out", out, "--resume", "latest")
    assert_refused(counted, "number of training samples: checkpoint")


@pytest.mark.parametrize("flag, value, named", [("--batch-size", "4", "batch_size: checkpoint 8, now 4"),
                                                ("--lr", "0.5", "lr: checkpoint"),
                                                ("--seed", "3", "seed: checkpoint 0, now 3")])
def test_resume_under_other_training_options_is_refused(demo, tmp_path, flag, value, named):
    data = captions_copy(demo, tmp_path / "data")
    out = interrupted_run(tmp_path / "run", data)
    refused = finetune("--data", data, "--steps", "4", "--val-fraction", "0", "--out", out, "--resume", "latest",
                       flag, value)
    assert_refused(refused, named)


def test_resume_may_run_longer_and_log_differently_but_not_shorter(demo, tmp_path):
    data = captions_copy(demo, tmp_path / "data")
    out = interrupted_run(tmp_path / "run", data)
    longer = finetune("--data", data, "--steps", "4", "--val-fraction", "0", "--out", out, "--resume", "latest",
                      "--log-every", "2", "--save-every", "0")
    assert longer.exit_code == 0, longer.output
    shorter = finetune("--data", data, "--steps", "3", "--val-fraction", "0", "--out", out, "--resume", "latest")
    assert_refused(shorter, "at step 4, beyond this run's 3 steps", "--steps 4 or more")


def test_a_batch_of_one_pair_is_refused(demo, tmp_path):
    assert_refused(finetune("--data", demo["target"], "--steps", "2", "--out", tmp_path / "run", "--batch-size", "1"),
                   "batch_size must be at least 2", "contrastive")
    assert not (tmp_path / "run").exists()


def test_one_class_is_refused(demo, tmp_path):
    root = tmp_path / "one"
    shutil.copytree(demo["target"] / "train" / sorted(p.name for p in (demo["target"] / "train").iterdir())[0],
                    root / "only")
    assert_refused(finetune("--data", root, "--steps", "2", "--out", tmp_path / "run"),
                   str(root), "two classes or more", "found 1")


def test_a_warmup_longer_than_the_run_is_scaled_and_said(demo, tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--model", "tiny", "--data", str(demo["target"]), "--steps", "10",
                                       "--batch-size", "8", "--no-evaluate", "--log-every", "1",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "warmup_steps 50 is not below the run's 10 steps" in result.output
    assert "warming up over 1 steps instead" in result.output
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    # The lr reaches --lr (1e-5) after the one warmup step, then follows the cosine (open_clip's
    # cosine_lr with warmup 1 over 10 steps: the reference the schedule is tested against).
    import torch
    from open_clip_train.scheduler import cosine_lr

    reference = cosine_lr(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), 1e-5, 1, 10)
    assert lrs == pytest.approx([reference(step) for step in range(10)], rel=1e-9)
    assert max(lrs) == pytest.approx(1e-5)


def test_a_warmup_longer_than_an_lp_ft_phase_is_scaled(demo, tmp_path):
    lp = finetune("--data", demo["target"], "--steps", "40", "--warmup-steps", "30", "--strategy", "lp-ft",
                  "--lp-steps", "20", "--out", tmp_path / "lp", "--save-every", "0")
    assert lp.exit_code == 0, lp.output
    assert "(or an LP-FT phase)" in lp.output and "warming up over 2 steps instead" in lp.output


def test_a_tiny_held_out_split_is_named(demo, tmp_path):
    data = captions_copy(demo, tmp_path / "data", limit=12)
    result = CliRunner().invoke(main, ["finetune", "--model", "tiny", "--data", str(data), "--steps", "2",
                                       "--batch-size", "8", "--warmup-steps", "1", "--num-workers", "0",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "warning: the held-out split has only 1 sample: one sample moves its scores by 1.00" in result.output
