"""`mlxclip report RUN_DIR`: a fine-tuning run as a person reads it — `training.png` (loss, lr,
logit scale, throughput, memory against the step), `evaluation.png` (each evaluation metric
against the step) and `report.md` (config, data counts, bad images, best and final metrics,
time). Everything comes from what the run folder already holds: `config.json`, `metrics.jsonl`,
`bad_images.txt`, `best/best.json`, and the figures of evaluations written into it (`mlxclip eval
--out RUN_DIR/eval`, `--compare`, a WiSE-FT sweep), which the report links."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from mlx_clip.errors import ConfigError
from mlx_clip.evaluation.figures import figure
from mlx_clip.training.monitor import MetricsLog

TRAINING_PANELS = (("loss", "loss"), ("lr", "learning rate"), ("logit_scale", "logit scale"),
                   ("images_per_s", "images / s"), ("memory", "memory (GiB)"))
_MEMORY_KEYS = ("peak_bytes", "peak_rss_bytes", "active_bytes")
# Run-folder entries that hold models, checkpoints and event files, never an evaluation's figures.
_NOT_EVALUATIONS = ("checkpoints", "final", "best", "tensorboard")


@dataclass
class RunReport:
    markdown: Path
    figures: list[Path]
    summary: dict
    evaluation_figures: list[Path] = field(default_factory=list)  # found in the run folder, linked


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read(run: Path) -> tuple[dict, list[dict]]:
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run folder")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run}: not a run folder (no metrics.jsonl; `mlxclip finetune --out` writes one)")
    try:
        records = MetricsLog(metrics).read()
    except json.JSONDecodeError as err:
        raise ConfigError(f"{metrics}: line {err.lineno} is not JSON ({err.msg})") from None
    config = {}
    if (run / "config.json").is_file():
        config = json.loads((run / "config.json").read_text())
    return config, records


def summarize(run: Path) -> dict:
    config, records = _read(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    start = next((r for r in records if r.get("event") == "start"), {})
    times = [r["time"] for r in records if _finite(r.get("time"))]
    bad_file = run / "bad_images.txt"
    best_file = run / "best" / "best.json"
    return {
        "run": str(run),
        "config": config,
        "steps": steps[-1]["step"] if steps else 0,
        "skipped_steps": sum(bool(r.get("skipped")) for r in steps),
        "final_loss": steps[-1]["loss"] if steps else None,
        "data": {k: start[k] for k in ("train_samples", "val_samples", "trainable_parameters", "engine",
                                       "shared_captions", "negative_captions", "rows_with_negatives") if k in start},
        "bad_images": len(bad_file.read_text().splitlines()) if bad_file.is_file() else 0,
        "before": evals[0]["eval"] if evals and evals[0]["step"] == 0 else None,
        "final": evals[-1]["eval"] if evals else None,
        "best": json.loads(best_file.read_text()) if best_file.is_file() else None,
        "best_by_metric": {k: max((e["eval"][k], e["step"]) for e in evals if _finite(e["eval"].get(k)))
                           for k in sorted({k for e in evals for k in e["eval"]})
                           if any(_finite(e["eval"].get(k)) for e in evals)},
        "wall_seconds": (max(times) - min(times)) if len(times) > 1 else None,
        "images_per_s": (sum(r["images_per_s"] for r in steps if _finite(r.get("images_per_s"))) /
                         max(1, sum(_finite(r.get("images_per_s")) for r in steps))) if steps else None,
    }


def _plot_training(records: list[dict], path: Path) -> None:
    steps = [r for r in records if "loss" in r]
    fig = figure(11, 6)
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title) in zip(axes, TRAINING_PANELS):
        if key == "memory":
            memory_key = next((k for k in _MEMORY_KEYS if any(_finite(r.get(k)) for r in steps)), None)
            points = [(r["step"], r[memory_key] / 2 ** 30) for r in steps if memory_key and _finite(r.get(memory_key))]
            title = f"{title}: {memory_key}" if memory_key else title
        else:
            points = [(r["step"], r[key]) for r in steps if _finite(r.get(key))]
        if points:
            ax.plot(*zip(*points), lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].axis("off")
    fig.savefig(path, dpi=110)


def _plot_evaluation(records: list[dict], path: Path) -> bool:
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    keys = sorted({k for e in evals for k, v in e["eval"].items() if _finite(v)})
    if not keys:
        return False
    fig = figure(7, 4)
    ax = fig.subplots()
    for key in keys:
        points = [(e["step"], e["eval"][key]) for e in evals if _finite(e["eval"].get(key))]
        ax.plot(*zip(*points), marker="o", lw=1.2, label=key)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _is_run_report(folder: Path) -> bool:
    return (folder / "report.md").is_file() and (folder / "summary.json").is_file()


def evaluation_figures(run: Path, out: Path) -> list[Path]:
    """Every PNG under `run` that an evaluation wrote there, sorted by path: all of them but those
    in the model, checkpoint and TensorBoard folders and in run reports (`out`, or an earlier one)."""
    out = out.resolve()
    found = []
    for png in sorted(run.rglob("*.png")):
        if png.relative_to(run).parts[0] in _NOT_EVALUATIONS:
            continue
        if png.parent.resolve() == out or _is_run_report(png.parent):
            continue
        found.append(png)
    return found


def _evaluation_section(run: Path, out: Path, figures: list[Path]) -> list[str]:
    lines = ["", "## Evaluation figures", ""]
    if not figures:
        return lines + [f"No evaluation figures under {run} (`mlxclip eval --out {run}/eval` writes them there)."]
    # Relative to the report, so that the run folder can be moved or shared as a whole.
    links = [Path(os.path.relpath(png.resolve(), out.resolve())).as_posix() for png in figures]
    return lines + [f"- [{png.relative_to(run).as_posix()}]({quote(link)})" for png, link in zip(figures, links)]


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_run_report(run: str | Path, out: str | Path | None = None) -> RunReport:
    run = Path(run)
    out = Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    _, records = _read(run)
    summary = summarize(run)
    figures = [out / "training.png"]
    _plot_training(records, figures[0])
    if _plot_evaluation(records, out / "evaluation.png"):
        figures.append(out / "evaluation.png")
    cfg = summary["config"]
    wall = summary["wall_seconds"]
    lines = [f"# Run report: {run}", "",
             "| | |", "|---|---|",
             f"| model | {cfg.get('model', '—')} |", f"| engine | {cfg.get('backend', '—')} |",
             f"| strategy | {cfg.get('strategy', '—')} |", f"| steps | {summary['steps']} |",
             f"| skipped (non-finite) steps | {summary['skipped_steps']} |",
             f"| final loss | {_fmt(summary['final_loss'])} |",
             f"| mean images/s | {_fmt(summary['images_per_s'])} |",
             f"| wall time | {'—' if wall is None else f'{wall:.0f} s'} |",
             f"| bad images (skipped) | {summary['bad_images']} |"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in summary["data"].items()]
    metric_keys = sorted(set(summary["final"] or {}) | set(summary["before"] or {}))
    if metric_keys:
        lines += ["", "| metric | before | final | best (step) |", "|---|---|---|---|"]
        for key in metric_keys:
            best = summary["best_by_metric"].get(key)
            lines.append(f"| {key} | {_fmt((summary['before'] or {}).get(key))} | "
                         f"{_fmt((summary['final'] or {}).get(key))} | "
                         f"{'—' if best is None else f'{best[0]:.4f} ({best[1]})'} |")
    if summary["best"]:
        b = summary["best"]
        lines += ["", f"Kept model: `best/` ({b['metric']} {b['value']:.4f} at step {b['step']})."]
    lines += ["", "## Config", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in cfg.items()]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in figures]]
    found = evaluation_figures(run, out)
    lines += _evaluation_section(run, out, found)
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return RunReport(markdown, figures, summary, found)
