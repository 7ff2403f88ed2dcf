"""A run stopped by Ctrl-C (SIGINT) or killed (SIGKILL) in the middle of writing a checkpoint,
then resumed, ends bit-identical to an uninterrupted run, in both engines."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.train_helpers import assert_same_weights, final_weights, run, small_config

pytestmark = pytest.mark.slow
STEPS = 100


def cli(out, engine, *extra):
    return [sys.executable, "-m", "mlx_clip", "finetune", "--backend", engine, "--model", "tiny", "--steps", str(STEPS),
            "--batch-size", "8", "--warmup-steps", "2", "--out", str(out), "--save-every", "5",
            "--log-every", "1", "--num-workers", "1", "--no-evaluate", *extra]


def logged_step(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_sigint_then_resume_matches_uninterrupted(tmp_path, engine):
    reference = tmp_path / "reference"
    run(small_config(reference, engine, steps=STEPS, save_every=5))

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(cli(out, engine), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while logged_step(out) < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted at step" in output and "Traceback" not in output
    stopped_at = logged_step(out)
    assert 12 <= stopped_at < STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:07d}"

    resumed = subprocess.run(cli(out, engine, "--resume", "latest"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(out), final_weights(reference))


KILL_SCRIPT = """
import os, signal, sys
import mlx_clip
from mlx_clip.training import run_folder
from tests.train_helpers import run, small_config

original = run_folder.RunFolder.save

def save(self, step, write_engine_state, trainer_state, keep):
    if step == 10:
        def write_then_die(folder):
            write_engine_state(folder)          # half a checkpoint on disk...
            os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies before finishing it
        return original(self, step, write_then_die, trainer_state, keep)
    return original(self, step, write_engine_state, trainer_state, keep)

run_folder.RunFolder.save = save
run(small_config(sys.argv[1], sys.argv[2], steps=20, save_every=5))
"""


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_sigkill_during_save_keeps_last_checkpoint(tmp_path, engine):
    reference = tmp_path / "reference"
    run(small_config(reference, engine, steps=20, save_every=5))

    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(out), engine],
                          capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-0000005"
    assert not (checkpoints / "step-0000010").exists()
    assert list(checkpoints.glob(".tmp-step-0000010-*"))  # the half-written one, ignored

    run(small_config(out, engine, steps=20, save_every=5, resume="latest"))
    assert not list(checkpoints.glob(".tmp-*"))
    assert_same_weights(final_weights(out), final_weights(reference))
