"""`benchmarks/gpu.sh` and its report, on a machine without a GPU.

The script itself runs here against a stand-in worker (a fake `python` that answers the worker's
tasks with canned figures, a failure and a hang, and hands everything else to the real
interpreter), so its bash — time limits, failed and skipped rows, the missing mlx[cuda] — is
exercised in seconds. The report is checked on fixture rows; the worker's device helpers on the CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_clip.benchmarks import gpu_report
from mlx_clip.benchmarks.gpu_report import RATIOS, Row, plan, summarize

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
BATCH = 16

FAKE_WORKER = """
import json, sys, time
task, args = sys.argv[1], json.loads(sys.argv[2])
gpu = {"device": "cuda: Fake GPU", "peak_gpu_bytes": 3 * 2 ** 30, "tf32": False}
if task == "open_clip" and args["precision"] == "amp_bf16":
    sys.exit("Traceback (most recent call last):\\ntorch.OutOfMemoryError: CUDA out of memory")
if task == "open_clip" and args.get("tf32") is False:
    time.sleep(60)
if task == "on_device":
    print(json.dumps({"image_seconds": [0.1, 0.1, 0.2], "text_seconds": [0.05] * 3, "accelerator": gpu}))
    sys.exit()
step = {"train": 0.5, "open_clip": 0.25}[task] if args["precision"] == "fp32" else 0.2
print("a warning on stdout first")
print(json.dumps({"seconds": [step] * 3, "loss": 2.5, "first_loss": 3.0,
                  "accelerator": {**gpu, "tf32": task == "open_clip"}}))
"""

FAKE_PYTHON = """#!/usr/bin/env bash
if [[ $1 == -m && $2 == mlx_clip.benchmarks.worker ]]; then exec "{real}" "{worker}" "$3" "$4"; fi
if [[ $1 == -c && $2 == *"import torch;"* ]]; then echo "2.14.1+fake, CUDA 13.0, available: True"; exit; fi
if [[ $1 == -c && $2 == *"resolve("* ]]; then echo vit-b32; exit; fi
exec "{real}" "$@"
"""


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """One run of gpu.sh against the stand-in worker: (process, OUT_DIR)."""
    tmp = tmp_path_factory.mktemp("gpu")
    (tmp / "worker.py").write_text(FAKE_WORKER)
    python = tmp / "python"
    python.write_text(FAKE_PYTHON.format(real=sys.executable, worker=tmp / "worker.py"))
    python.chmod(0o755)
    (tmp / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # as where the driver is missing
    (tmp / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "GPU_BENCH_SKIP_INSTALL": "1", "GPU_BENCH_PYTHON": str(python), "GPU_BENCH_BATCH": str(BATCH),
           "GPU_BENCH_ROW_LIMIT_S": "3", "PATH": f"{tmp}:{os.environ['PATH']}"}
    out = tmp / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, out


def test_script_records_every_row_and_never_aborts(fake_run):
    proc, out = fake_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "gpu.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == [row.name for row in plan("b32", BATCH, 5, 2, "cuda", "gpu")]
    torch_fp32 = rows["torch fp32"]
    assert torch_fp32["images_per_s"] == pytest.approx(BATCH / 0.5) and torch_fp32["step_seconds"] == 0.5
    assert torch_fp32["peak_gpu_bytes"] == 3 * 2 ** 30 and torch_fp32["device"] == "cuda: Fake GPU"
    assert torch_fp32["loss"] == 2.5 and torch_fp32["first_loss"] == 3.0
    assert rows["torch inference"]["images_per_s"] == pytest.approx(BATCH / 0.1)
    assert rows["torch inference"]["texts_per_s"] == pytest.approx(BATCH / 0.05)
    assert rows["open_clip amp_bf16"]["error"] == "torch.OutOfMemoryError: CUDA out of memory"
    assert rows["open_clip fp32 no-tf32"]["error"].startswith("timed out after")
    assert results["ratios"]["torch_over_open_clip_fp32"] == pytest.approx(0.5)
    assert results["ratios"]["torch_over_open_clip_amp_bf16"] is None
    assert results["settings"] == {"model": "vit-b32", "size": "b32", "batch": BATCH, "steps": 5, "warmup": 2}
    machine = results["machine"]
    assert machine["GPU"].startswith("no GPU found") and machine["torch"].startswith("2.14.1+fake")
    # The stand-in answers only the worker: the mlx[cuda] probe ran the real MLX of this machine.
    import mlx.core as mx

    markdown = (out / "gpu.md").read_text()
    if not mx.cuda.is_available():
        assert machine["mlx[cuda]"] == "unavailable: mx.cuda.is_available() is False"
        for name in ("mlx fp32", "mlx inference", "mlx amp_bf16"):
            assert rows[name]["error"] == "mlx[cuda] unavailable: mx.cuda.is_available() is False"
        assert "| mlx fp32 | skipped: mlx[cuda] unavailable: mx.cuda.is_available() is False |" in markdown
    assert markdown in proc.stdout and (out / "gpu.log").read_text().endswith("gpu.md\n")
    assert "| torch fp32 | cuda: Fake GPU | 32.0 | — | 0.5000 | 3.00 GiB | 3.0000 | 2.5000 |" in markdown
    assert "| open_clip fp32 | cuda: Fake GPU + TF32 |" in markdown
    assert "| open_clip amp_bf16 | failed: torch.OutOfMemoryError: CUDA out of memory |" in markdown


def test_script_out_of_time_skips_rows_instead_of_running_them(tmp_path, fake_run):
    _, out = fake_run
    python = out.parent / "python"
    env = {**os.environ, "GPU_BENCH_SKIP_INSTALL": "1", "GPU_BENCH_PYTHON": str(python), "GPU_BENCH_BUDGET_S": "5"}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert all(row["error"].startswith(("out of time", "mlx[cuda]")) for row in rows), rows


# --- the report ---------------------------------------------------------------------------------

def _row(name: str, task: str = "train") -> Row:
    return Row(name, task, {"batch_size": 256})


def _train(step: float) -> str:
    return json.dumps({"seconds": [step, step * 2, step], "loss": 1.0, "first_loss": 2.0,
                       "accelerator": {"device": "cuda: H100", "peak_gpu_bytes": 2 ** 30, "tf32": False}})


@pytest.mark.parametrize("status,stdout,stderr,error", [
    ("skipped", "", "mlx[cuda] unavailable: no wheel\n\n", "mlx[cuda] unavailable: no wheel"),
    ("124", "", "", "timed out after 90 s"),
    ("137", "", "", "timed out after 90 s"),
    ("1", "", "Traceback ...\nRuntimeError: CUDA error: no kernel image\n", "RuntimeError: CUDA error: no kernel image"),
    ("139", "", "", "exit 139"),
    ("0", "not json\n", "", "no result line on stdout"),
    ("0", "", "", "no result line on stdout"),
])
def test_failed_rows_say_why(status, stdout, stderr, error):
    assert summarize(_row("torch fp32"), status, 90.0, stdout, stderr)["error"] == error


def test_train_and_inference_figures():
    row = summarize(_row("torch fp32"), "0", 12.0, "log line\n" + _train(0.25) + "\n", "warnings\n")
    assert row["step_seconds"] == 0.25 and row["images_per_s"] == 1024 and row["peak_gpu_bytes"] == 2 ** 30
    inference = json.dumps({"image_seconds": [0.5, 0.1, 0.1], "text_seconds": [0.2, 0.2, 0.9], "memory": {}})
    row = summarize(_row("torch inference", "on_device"), "0", 5.0, inference, "")
    assert row["images_per_s"] == pytest.approx(2560) and row["texts_per_s"] == pytest.approx(1280)
    assert row["device"] == "unknown" and row["peak_gpu_bytes"] is None


def _fixture(tmp_path: Path, outcomes: dict[str, tuple[str, str, str]]) -> Path:
    """An OUT_DIR as gpu.sh leaves it: the plan, rows.tsv and each row's stdout / stderr."""
    gpu_report.main(["plan", str(tmp_path), "--size", "b32", "--model", "vit-b32", "--batch", "256", "--steps", "5",
                     "--warmup", "2", "--device", "cuda", "--mlx-device", "gpu"])
    (tmp_path / "rows").mkdir()
    lines = []
    for index, (name, (status, stdout, stderr)) in enumerate(outcomes.items()):
        stem = f"rows/{index:02d}"
        (tmp_path / f"{stem}.out").write_text(stdout)
        (tmp_path / f"{stem}.err").write_text(stderr)
        lines.append(f"{name}\t{status}\t30\t{stem}\n")
    (tmp_path / "rows.tsv").write_text("".join(lines))
    return tmp_path


def test_report_from_fixture_rows(tmp_path, capsys):
    inference = json.dumps({"image_seconds": [0.1] * 3, "text_seconds": [0.05] * 3,
                            "accelerator": {"device": "cuda: H100", "peak_gpu_bytes": 2 ** 29}})
    no_mlx = ("skipped", "", "mlx[cuda] unavailable: install failed: no matching distribution")
    out = _fixture(tmp_path, {
        "torch fp32": ("0", _train(0.5), ""), "open_clip fp32": ("0", _train(0.4), ""),
        "torch amp_bf16": ("0", _train(0.2), ""), "open_clip amp_bf16": ("0", _train(0.25), ""),
        "torch inference": ("0", inference, ""),
        "mlx fp32": no_mlx, "mlx inference": no_mlx, "mlx amp_bf16": no_mlx,
        # "open_clip fp32 no-tf32" never reached: the script stopped
    })
    gpu_report.main(["report", str(out), "--gpu", "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB",
                     "--mlx-cuda", "unavailable: install failed", "--seconds", "300"])
    results = json.loads((out / "gpu.json").read_text())
    ratios = results["ratios"]
    assert ratios["torch_over_open_clip_fp32"] == pytest.approx(0.8)
    assert ratios["torch_over_open_clip_amp_bf16"] == pytest.approx(1.25)
    assert ratios["torch_over_open_clip_fp32_no_tf32"] is None
    assert all(ratios[key] is None for key in ratios if key.startswith("mlx_"))
    rows = {row["name"]: row for row in results["rows"]}
    assert rows["open_clip fp32 no-tf32"]["error"].startswith("not run")
    assert rows["mlx fp32"]["error"] == "mlx[cuda] unavailable: install failed: no matching distribution"
    markdown = (out / "gpu.md").read_text()
    assert capsys.readouterr().out == markdown
    assert "- GPU: NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB" in markdown
    assert "| torch inference | cuda: H100 | 2560.0 | 5120.0 | 0.1000 | 0.50 GiB | — | — |" in markdown
    assert "| torch engine / open_clip, fp32 (open_clip with TF32, as open_clip_train runs on CUDA) | 0.80 | " \
           "≥ 1.0: not met |" in markdown
    assert "| torch engine / open_clip, amp_bf16 | 1.25 | ≥ 1.0: met |" in markdown
    assert "| MLX engine / torch engine, train fp32 | — |  |" in markdown


def test_every_ratio_names_planned_rows():
    names = [row.name for row in plan("b32", 256, 5, 2, "cuda", "gpu")]
    assert len(set(names)) == len(names)
    assert all(r.numerator in names and r.denominator in names for r in RATIOS)


def test_pins_come_from_the_test_extra(tmp_path):
    assert gpu_report.pins(ROOT / "pyproject.toml") == ["torch==2.14.1", "torchvision==0.29.1",
                                                        "open_clip_torch==3.3.0"]
    (tmp_path / "pyproject.toml").write_text('[project.optional-dependencies]\ntest = ["torchvision==1"]\n')
    with pytest.raises(ValueError, match="pins no torch, open_clip_torch"):
        gpu_report.pins(tmp_path / "pyproject.toml")


def test_report_module_runs_by_path_without_the_package(tmp_path):
    """gpu.sh calls it by path with the venv's Python, which may not have the project installed."""
    proc = subprocess.run([sys.executable, "-I", "-S", str(ROOT / "benchmarks" / "gpu_report.py"), "pins",
                           str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.split() == ["torch==2.14.1", "torchvision==0.29.1",
                                                             "open_clip_torch==3.3.0"], proc.stderr


# --- the worker's device helpers, on the CPU ------------------------------------------------------

def test_timed_waits_for_the_device_before_each_reading():
    from mlx_clip.benchmarks.worker import timed

    events = []
    times, outputs = timed(lambda: events.append("run") or len(events), 3, 2, sync=lambda: events.append("sync"))
    assert events == ["run", "run", "sync"] + ["run", "sync"] * 3
    assert len(times) == 3 and outputs == [1, 2, 4, 6, 8]
    assert len(timed(lambda: None, 2, 0)[0]) == 2  # no sync given: nothing to wait for


def test_torch_helpers_on_the_cpu():
    import torch

    from mlx_clip.benchmarks import worker
    from mlx_clip.errors import ConfigError

    assert worker.torch_sync(torch.device("cpu"))() is None
    assert worker.torch_device_report(torch.device("cpu")) == {"device": "cpu"}
    if not torch.cuda.is_available():
        assert worker.device_report("torch") == {"device": "cpu"}

    class Engine:
        name, device = "torch", torch.device("cpu")

    assert worker.engine_sync(Engine())() is None
    device, autocast = worker._peer_setup({"precision": "amp_bf16", "device": "cpu"})
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with worker._peer_setup({"device": "cpu"})[1]():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ConfigError, match="precision must be one of fp32, amp_bf16, got 'fp16'"):
        worker._peer_setup({"precision": "fp16"})


def test_mlx_report_says_cpu_without_a_gpu():
    import mlx.core as mx

    from mlx_clip.benchmarks.worker import mlx_device_report

    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert mlx_device_report() == {"device": "cpu"}
    finally:
        mx.set_default_device(previous)


@pytest.mark.parametrize("metal,cuda,expected", [(False, False, "cpu"), (False, True, "gpu"), (True, False, "gpu")])
def test_mlx_auto_selection_sees_cuda_as_well_as_metal(monkeypatch, metal, cuda, expected):
    """mlx[cuda] on Linux: `--device gpu` and auto selection find the GPU as on a Mac."""
    import mlx.core as mx

    from mlx_clip.mlx_backend.backend import select_device

    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: cuda)
    assert select_device(None) == expected
    if expected == "gpu":
        assert select_device("gpu") == "gpu"
