"""Nothing a user made is deleted or replaced without --overwrite, never an input of the same
command; a run refused or interrupted before its first step leaves nothing that blocks a retry; a
Ctrl-C at any moment says what survived. Each case here lost work before (issue 20)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlx_clip.finetune as finetune_module
from mlx_clip.api import resolve
from mlx_clip.training.run_folder import RunFolder
from mlx_clip.cli import main
from mlx_clip.training.trainer import Interrupted
from tests.train_helpers import assert_same_weights, final_weights, run, small_config
from tests.helpers import assert_refused

TINY_RUN = ["--model", "tiny", "--steps", "2", "--batch-size", "8", "--warmup-steps", "1", "--num-workers", "0",
            "--no-evaluate", "--save-every", "0"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_copy(tmp_path):
    """A model folder the user owns, with a neighbour beside it."""
    parent = tmp_path / "models"
    shutil.copytree(resolve("tiny"), parent / "tiny")
    (parent / "notes.txt").write_text("my notes")
    return parent / "tiny"


# --- the demo preset ------------------------------------------------------------------------------
def test_demo_preset_never_replaces_a_run_in_a_folder_the_user_named(tmp_path):
    out = tmp_path / "mine"
    first = invoke("finetune", *TINY_RUN, "--out", out)
    assert first.exit_code == 0, first.output
    kept = tree(out)
    # No --data: the demo preset, whose folder used to be replaced because the preset said overwrite.
    assert_refused(invoke("finetune", *TINY_RUN, "--out", out), "already holds a run", "--overwrite")
    assert tree(out) == kept


def test_the_demo_folder_is_replaced_only_when_it_holds_a_demo_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo_out = Path(finetune_module.DEMO_OUT)
    assert invoke("finetune", *TINY_RUN).exit_code == 0
    again = invoke("finetune", *TINY_RUN)  # the demo again: its own scratch folder is replaced
    assert again.exit_code == 0 and "replacing the run in" in again.output, again.output
    # A run of the user's own data that happens to live in runs/demo is the user's.
    config = json.loads((demo_out / "config.json").read_text())
    (demo_out / "config.json").write_text(json.dumps({**config, "data": "my/captions.csv"}))
    kept = tree(demo_out)
    assert_refused(invoke("finetune", *TINY_RUN), "already holds a run")
    assert tree(demo_out) == kept


# --- --overwrite never removes an input -----------------------------------------------------------
@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_convert_overwrite_never_removes_the_source(tiny_copy, where):
    dst = {"parent": tiny_copy.parent, "same": tiny_copy, "inside": tiny_copy / "mlx"}[where]
    before = tree(tiny_copy.parent)
    assert_refused(invoke("convert", tiny_copy, dst, "--to", "mlx", "--overwrite"), str(tiny_copy), "source")
    assert tree(tiny_copy.parent) == before


def test_export_overwrite_never_removes_the_model(tiny_copy):
    before = tree(tiny_copy.parent)
    assert_refused(invoke("export", tiny_copy, tiny_copy.parent, "--to", "onnx", "--overwrite"), "source")
    assert tree(tiny_copy.parent) == before


def test_wise_ft_overwrite_never_removes_an_input(tiny_copy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_copy, other)
    before = tree(tiny_copy.parent)
    assert_refused(invoke("wise-ft", "--zero-shot", tiny_copy, "--fine-tuned", other, "--out", tiny_copy.parent,
                          "--overwrite"), "contains an input checkpoint (--zero-shot)")
    assert tree(tiny_copy.parent) == before


def test_wise_ft_overwrite_replaces_the_folder_whole(tiny_copy, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    assert_refused(invoke("wise-ft", "--zero-shot", tiny_copy, "--fine-tuned", tiny_copy, "--out", out),
                   "not empty")
    result = invoke("wise-ft", "--zero-shot", tiny_copy, "--fine-tuned", tiny_copy, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_finetune_overwrite_never_removes_its_own_model(tmp_path):
    out = tmp_path / "run"
    assert invoke("finetune", *TINY_RUN, "--out", out).exit_code == 0
    before = tree(out)
    # Continue from the run's own final model into the same folder: --overwrite would delete final/.
    assert_refused(invoke("finetune", *TINY_RUN[2:], "--model", out / "final", "--out", out, "--overwrite"),
                   "final", "--model")
    assert tree(out) == before


def test_finetune_out_inside_the_data_is_refused(tmp_path):
    from mlx_clip.data.demo import make_demo

    data = make_demo(tmp_path / "demo", image_size=16, per_class_train=2, per_class_val=1, per_class_control=1)
    root = data["target"]
    before = tree(root)
    assert_refused(invoke("finetune", *TINY_RUN, "--data", root, "--out", root / "run"), "is inside --data")
    assert tree(root) == before


# --- a refused or interrupted start leaves nothing in the way -------------------------------------
def test_a_run_refused_late_leaves_no_folder_and_the_retry_runs(tmp_path):
    out = tmp_path / "run"
    # LP-FT's probe phase is checked once the trainer is built, after the model and data.
    refused = invoke("finetune", *TINY_RUN, "--strategy", "lp-ft", "--lp-steps", "5", "--out", out)
    assert_refused(refused, "lp_steps must be below")
    assert not out.exists()
    assert invoke("finetune", *TINY_RUN, "--out", out).exit_code == 0


def test_a_folder_whose_run_never_stepped_is_not_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "event": "start"}) + "\n")
    resumed = invoke("finetune", *TINY_RUN, "--out", out, "--resume", "latest")
    assert_refused(resumed, "no complete checkpoint", "never reached its first step", "without --resume")
    again = invoke("finetune", *TINY_RUN, "--out", out)
    assert again.exit_code == 0 and "never reached its first step" in again.output, again.output
    assert (out / "final" / "model.safetensors").is_file()


def test_ctrl_c_while_starting_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "build_engine", interrupted)
    out = tmp_path / "run"
    assert_refused(invoke("finetune", *TINY_RUN, "--out", out), "interrupted while starting", code=130)
    assert not out.exists()


def test_a_second_ctrl_c_during_a_save_names_the_checkpoint_that_survived(tmp_path, monkeypatch):
    out = tmp_path / "run"
    reference = tmp_path / "reference"
    run(small_config(reference, "mlx", steps=10, save_every=4))
    real_save = RunFolder.save

    def save(self, step, write_engine_state, trainer_state, keep):
        if step == 8:
            def write_then_interrupt(folder):
                write_engine_state(folder)
                raise KeyboardInterrupt  # the second Ctrl-C lands in the middle of the save
            return real_save(self, step, write_then_interrupt, trainer_state, keep)
        return real_save(self, step, write_engine_state, trainer_state, keep)

    monkeypatch.setattr(RunFolder, "save", save)
    with pytest.raises(Interrupted, match=r"stopped at once at step 8; the last complete checkpoint is "
                                          r".*step-0000004; continue with --resume latest"):
        run(small_config(out, "mlx", steps=10, save_every=4))
    monkeypatch.setattr(RunFolder, "save", real_save)
    run(small_config(out, "mlx", steps=10, save_every=4, resume="latest"))
    assert_same_weights(final_weights(out), final_weights(reference))


# --- outputs that cannot be written ---------------------------------------------------------------
def test_outputs_that_cannot_be_created_are_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_refused(invoke("finetune", *TINY_RUN, "--out", blocker / "run"), str(blocker), "not a folder")
    assert_refused(invoke("finetune", *TINY_RUN, "--out", "/proc/mlxclip-run"), "/proc/mlxclip-run")
    assert_refused(invoke("embed", "--model", "tiny", "--text", "a cat", "--out", blocker / "e.npz"),
                   str(blocker), "not a folder")
    assert_refused(invoke("embed", "--model", "tiny", "--text", "a cat", "--out", "/proc/x/e.npz"), "/proc")


def test_eval_outputs_are_checked_before_any_model_loads(tmp_path):
    from mlx_clip.data.demo import make_demo

    data = make_demo(tmp_path / "demo", image_size=16, per_class_train=1, per_class_val=1, per_class_control=1)
    val = data["target"] / "val"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = tree(val)
    assert_refused(invoke("eval", "--model", "tiny", "--data", val, "--out", blocker / "report"), "not a folder")
    assert_refused(invoke("eval", "--model", "tiny", "--data", val, "--out", blocker / "r.json"), "not a folder")
    # A report written into the class folders would be read back as part of the data.
    assert_refused(invoke("eval", "--model", "tiny", "--data", val, "--out", val / "report"), "is inside --data")
    assert tree(val) == before


def test_sigterm_stops_at_a_step_with_a_checkpoint(tmp_path):
    """`kill`, `timeout`, a container's stop and a scheduler's preemption send SIGTERM: the run
    stops as on Ctrl-C, with a checkpoint to resume from (it used to die with nothing saved since
    the last --save-every)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_clip", "finetune", *TINY_RUN[:2], "--steps", "500",
                             *TINY_RUN[4:], "--log-every", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def stepped() -> bool:
        log = out / "metrics.jsonl"
        return log.exists() and '"loss"' in log.read_text()

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not stepped():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted at step" in output and "--resume latest" in output and "Traceback" not in output
    assert RunFolder(out).latest() is not None


def test_index_out_that_cannot_be_created_is_one_line(tmp_path):
    from mlx_clip.data.demo import make_demo

    images = make_demo(tmp_path / "demo", image_size=16, per_class_train=1, per_class_val=1,
                       per_class_control=1)["target"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_refused(invoke("index", images, "--model", "tiny", "--out", blocker / "idx"), "not a folder")
