"""`benchmarks/gpu.sh`'s plan and report: which rows it runs (one `mlx_clip.benchmarks.worker`
process each) and, from what each printed, `gpu.json` and `gpu.md`.

Standard library only, so that the script can run it by path with any Python 3.11, before the
project is installed or when its install failed:

    python benchmarks/gpu_report.py pins pyproject.toml
    python benchmarks/gpu_report.py plan OUT --size b32 --batch 256 --steps 5 --warmup 2
    python benchmarks/gpu_report.py report OUT --gpu "NVIDIA H100 ..." --mlx-cuda "ok: ..."

`plan` writes OUT/plan.tsv (what the script loops over) and OUT/plan.json; the script appends one
line per row to OUT/rows.tsv (name, exit status or "skipped", wall seconds, file stem) and leaves
the row's stdout and stderr in OUT/<stem>.out and .err; `report` reads them back.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# The torch stack `gpu.sh` installs, at the versions the test extra pins (open_clip is a test reference).
TORCH_STACK = ("torch", "torchvision", "open_clip_torch")
TIMED_OUT = (124, 137)  # coreutils `timeout`: the row's limit passed (137: it ignored SIGTERM too)


@dataclass(frozen=True)
class Row:
    name: str
    task: str  # the worker's task
    args: dict
    needs_mlx_gpu: bool = False  # run only where mlx[cuda] imported and saw the GPU
    limit_s: int = 100  # MLX's first CUDA run also compiles its kernels (NVRTC)


@dataclass(frozen=True)
class Ratio:
    key: str
    label: str
    numerator: str
    denominator: str
    figure: str = "images_per_s"
    goal: float | None = None


RATIOS = (
    Ratio("torch_over_open_clip_fp32", "torch engine / open_clip, fp32 (open_clip with TF32, as open_clip_train "
          "runs on CUDA)", "torch fp32", "open_clip fp32", goal=1.0),
    Ratio("torch_over_open_clip_fp32_no_tf32", "torch engine / open_clip, fp32, neither with TF32", "torch fp32",
          "open_clip fp32 no-tf32", goal=1.0),
    Ratio("torch_over_open_clip_amp_bf16", "torch engine / open_clip, amp_bf16", "torch amp_bf16",
          "open_clip amp_bf16", goal=1.0),
    # On a GPU run, MLX on CUDA; the device column says where each row ran.
    Ratio("mlx_over_torch_fp32", "MLX engine / torch engine, train fp32", "mlx fp32", "torch fp32"),
    Ratio("mlx_over_torch_amp_bf16", "MLX engine / torch engine, train amp_bf16", "mlx amp_bf16", "torch amp_bf16"),
    Ratio("mlx_over_torch_inference_images", "MLX engine / torch engine, inference images/s", "mlx inference",
          "torch inference"),
    Ratio("mlx_over_torch_inference_texts", "MLX engine / torch engine, inference texts/s", "mlx inference",
          "torch inference", figure="texts_per_s"),
)


def plan(size: str, batch: int, steps: int, warmup: int, device: str, mlx_device: str) -> list[Row]:
    """The rows in the order they run: the headline comparison (torch engine vs open_clip) first, so
    that a run short of time loses the least; `device` / `mlx_device` are passed explicitly, so a
    row whose GPU is missing fails instead of crawling through batch 256 on the CPU. The inference
    rows pick their device automatically (the worker's `inference` takes none)."""
    common = {"size": size, "batch_size": batch, "steps": steps, "warmup": warmup}
    torch_rows = {**common, "device": device}
    mlx_rows = {**common, "engine": "mlx", "device": mlx_device}
    return [
        Row("torch fp32", "train", {**torch_rows, "engine": "torch", "precision": "fp32"}),
        Row("open_clip fp32", "open_clip", {**torch_rows, "precision": "fp32"}),
        Row("torch amp_bf16", "train", {**torch_rows, "engine": "torch", "precision": "amp_bf16"}),
        Row("open_clip amp_bf16", "open_clip", {**torch_rows, "precision": "amp_bf16"}),
        Row("torch inference", "on_device", {**common, "task": "inference", "engine": "torch"}),
        Row("mlx fp32", "train", {**mlx_rows, "precision": "fp32"}, needs_mlx_gpu=True, limit_s=150),
        Row("mlx inference", "on_device", {**common, "task": "inference", "engine": "mlx"}, needs_mlx_gpu=True,
            limit_s=150),
        Row("mlx amp_bf16", "train", {**mlx_rows, "precision": "amp_bf16"}, needs_mlx_gpu=True, limit_s=150),
        Row("open_clip fp32 no-tf32", "open_clip", {**torch_rows, "precision": "fp32", "tf32": False}),
    ]


def pins(pyproject: Path, names: tuple[str, ...] = TORCH_STACK) -> list[str]:
    """The test extra's requirements for `names`, as written there (one place pins them)."""
    import tomllib

    extra = tomllib.loads(Path(pyproject).read_text())["project"]["optional-dependencies"]["test"]
    found = {re.split(r"[\s=<>!~;\[]", req, maxsplit=1)[0]: req for req in extra}
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"{pyproject}: the test extra pins no {', '.join(missing)}")
    return [found[name] for name in names]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def summarize(row: Row, status: str, wall_s: float, stdout: str, stderr: str) -> dict:
    """One table row from one worker run: its figures, or why there are none."""
    base = {"name": row.name, "task": row.task, "wall_s": wall_s}
    if status == "skipped":
        return {**base, "error": _last_line(stderr) or "no reason given", "skipped": True}
    code = int(status)
    if code in TIMED_OUT:
        return {**base, "error": f"timed out after {wall_s:.0f} s"}
    if code != 0:
        return {**base, "error": _last_line(stderr) or f"exit {code}"}
    try:
        result = json.loads(_last_line(stdout) or "null")
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return {**base, "error": "no result line on stdout"}
    batch = row.args["batch_size"]
    accelerator = result.get("accelerator", {})
    out = {**base, "device": accelerator.get("device", "unknown"), "tf32": accelerator.get("tf32"),
           "peak_gpu_bytes": accelerator.get("peak_gpu_bytes")}
    if "seconds" in result:  # a train step
        step = statistics.median(result["seconds"])
        return {**out, "images_per_s": batch / step, "step_seconds": step, "loss": result["loss"],
                "first_loss": result["first_loss"]}
    image, text = statistics.median(result["image_seconds"]), statistics.median(result["text_seconds"])
    return {**out, "images_per_s": batch / image, "texts_per_s": batch / text, "step_seconds": image}


def read_rows(out: Path) -> list[dict]:
    """Every planned row, summarised; one the script never reached says so."""
    planned = [Row(**row) for row in json.loads((out / "plan.json").read_text())]
    ran = {}
    manifest = out / "rows.tsv"
    for line in (manifest.read_text().splitlines() if manifest.exists() else []):
        name, status, wall_s, stem = line.split("\t")
        ran[name] = (status, float(wall_s), stem)
    rows = []
    for row in planned:
        if row.name not in ran:
            rows.append({"name": row.name, "task": row.task, "error": "not run (the script stopped before it)"})
            continue
        status, wall_s, stem = ran[row.name]
        text = {suffix: (out / f"{stem}.{suffix}").read_text(errors="replace") if (out / f"{stem}.{suffix}").exists()
                else "" for suffix in ("out", "err")}
        rows.append(summarize(row, status, wall_s, text["out"], text["err"]))
    return rows


def ratios(rows: list[dict]) -> dict[str, float | None]:
    """Speed over speed (images/s, or texts/s), None where either row has no figure."""
    by_name = {row["name"]: row for row in rows}
    values = {}
    for ratio in RATIOS:
        top, bottom = by_name.get(ratio.numerator, {}), by_name.get(ratio.denominator, {})
        values[ratio.key] = (top[ratio.figure] / bottom[ratio.figure]
                             if ratio.figure in top and ratio.figure in bottom else None)
    return values


def build(out: Path, machine: dict) -> dict:
    settings = json.loads((out / "settings.json").read_text())
    rows = read_rows(out)
    return {"settings": settings, "machine": machine, "rows": rows, "ratios": ratios(rows)}


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _gib(value) -> str:
    return "—" if value is None else f"{value / 2 ** 30:.2f} GiB"


def markdown(results: dict) -> str:
    settings, machine = results["settings"], results["machine"]
    lines = [f"# mlxclip on the GPU — {settings['model']}, batch {settings['batch']}, median of {settings['steps']} "
             f"steps after {settings['warmup']} warm-up, 77-token texts, full fine-tune, AdamW", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += ["", "| row | device | images/s | texts/s | step seconds | peak GPU memory | first loss | loss |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if "error" in row:
            outcome = "skipped" if row.get("skipped") else "failed"
            lines.append(f"| {row['name']} | {outcome}: {row['error'].replace('|', '/')} | | | | | | |")
            continue
        device = row["device"] + (" + TF32" if row.get("tf32") else "")
        lines.append(f"| {row['name']} | {device} | {row['images_per_s']:.1f} | {_fmt(row.get('texts_per_s'), '.1f')} | "
                     f"{row['step_seconds']:.4f} | {_gib(row.get('peak_gpu_bytes'))} | "
                     f"{_fmt(row.get('first_loss'), '.4f')} | {_fmt(row.get('loss'), '.4f')} |")
    lines += ["", "Inference rows: images/s and texts/s at the same batch; their step seconds encode one batch of "
                  "images. Same weights, same batch: the fp32 rows' first losses agree to float32 rounding.",
              "", "| ratio (speed / speed: 1.0 = as fast) | value | goal |", "|---|---|---|"]
    for ratio in RATIOS:
        value = results["ratios"][ratio.key]
        goal = "" if ratio.goal is None else f"≥ {ratio.goal:.1f}: " + (
            "—" if value is None else "met" if value >= ratio.goal else "not met")
        lines.append(f"| {ratio.label} | {_fmt(value, '.2f')} | {goal} |")
    return "\n".join(lines) + "\n"


def _plan_command(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = plan(args.size, args.batch, args.steps, args.warmup, args.device, args.mlx_device)
    (out / "plan.json").write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    (out / "settings.json").write_text(json.dumps({"model": args.model, "size": args.size, "batch": args.batch,
                                                   "steps": args.steps, "warmup": args.warmup}) + "\n")
    (out / "plan.tsv").write_text("".join(f"{row.name}\t{row.task}\t{json.dumps(row.args)}\t{row.limit_s}\t"
                                          f"{int(row.needs_mlx_gpu)}\n" for row in rows))


def _report_command(args) -> None:
    out = Path(args.out)
    machine = {"GPU": args.gpu, "torch": args.torch, "mlx[cuda]": args.mlx_cuda, "git": args.git,
               "wall time": f"{args.seconds:.0f} s"}
    results = build(out, machine)
    (out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / "gpu.md").write_text(text)
    print(text, end="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpu_report", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pins_parser = commands.add_parser("pins", help="print the torch stack's pinned requirements, one a line")
    pins_parser.add_argument("pyproject")
    plan_parser = commands.add_parser("plan", help="write OUT/plan.tsv, plan.json and settings.json")
    plan_parser.add_argument("out")
    plan_parser.add_argument("--size", required=True, help="the worker's size key: b32 | tiny")
    plan_parser.add_argument("--model", required=True, help="the built-in model that size is (for the title)")
    for name in ("batch", "steps", "warmup"):
        plan_parser.add_argument(f"--{name}", type=int, required=True)
    plan_parser.add_argument("--device", required=True, help="the torch rows' device: cuda | cpu | auto")
    plan_parser.add_argument("--mlx-device", required=True, help="the MLX train rows' device: gpu | cpu")
    report_parser = commands.add_parser("report", help="write OUT/gpu.json and gpu.md and print the markdown")
    report_parser.add_argument("out")
    for name in ("gpu", "torch", "mlx-cuda", "git"):
        report_parser.add_argument(f"--{name}", default="unknown")
    report_parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.command == "pins":
        print("\n".join(pins(Path(args.pyproject))))
    elif args.command == "plan":
        _plan_command(args)
    else:
        _report_command(args)


if __name__ == "__main__":
    main(sys.argv[1:])
