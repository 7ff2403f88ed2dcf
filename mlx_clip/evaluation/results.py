"""Evaluation results as files a person can read: JSON, a Markdown summary, PNG figures.

Holds one evaluation's report (`results_json`, `write_report`, CLIP_benchmark's per-result files)
and the base vs fine-tuned comparison (`compare_table`, `write_comparison`); the figures they link
are drawn by mlx_clip.evaluation.figures. Its value and JSON helpers (`_plain`, `_write_json`,
`_metrics_of`, ...) are shared by the other reports: the WiSE-FT curve
(mlx_clip.robust.wise_ft_report) and the training run's figures.

Result dicts are shaped like CLIP_benchmark's output (`{"dataset", "model", "task", "metrics"}`),
so its tooling reads ours. JSON is strict: NaN (a class without samples, a metric that does not
apply, such as acc5 over 5 classes or fewer, where CLIP_benchmark writes NaN) is written as null,
and shown as "n/a" in Markdown and figures; "—" marks a metric one side of a comparison lacks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clip.errors import DataError
from mlx_clip.evaluation.figures import (
    _class_names,
    _comparison_figure,
    _is_number,
    _metrics_of,
    _per_class_moves,
    _per_class_note,
    _per_class_pairs,
    _plot_confusion,
    _plot_per_class,
    _plot_per_class_compare,
    _plot_recall,
    _recall_at_k,
    _recall_note,
    _title,
)

__all__ = [
    "TASKS",
    "ReportFiles",
    "compare_table",
    "results_json",
    "write_comparison",
    "write_report",
]

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
_MOVES_ROWS = 10  # the comparison's Markdown lists this many most improved and most hurt classes


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    figures: tuple[Path, ...]


# --- values -----------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """numpy and NaN -> what strict JSON holds (NaN/inf become None)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x



def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


# --- results ----------------------------------------------------------------------------------


def results_json(dataset: str, model: str, task: str, metrics: Mapping, **extra: Any) -> dict:
    """One evaluation as CLIP_benchmark writes it, plus optional keys.

    Extra keys understood by the writers: `class_names` (C,), `per_class` (C,) accuracies aligned
    with them (NaN for a class without samples), `confusion_matrix` (C, C) counts, rows = true.
    """
    if task not in TASKS:
        raise DataError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(metrics, Mapping) or not metrics:
        raise DataError(f"metrics must be a non-empty dict, got {metrics!r}")
    out = {"dataset": str(dataset), "model": str(model), "task": task, "metrics": _plain(metrics)}
    out.update(_plain(extra))
    sizes = {}
    if "class_names" in out:
        sizes["class_names"] = len(out["class_names"])
    if "per_class" in out:
        sizes["per_class"] = len(out["per_class"])
    if "confusion_matrix" in out:
        cm = np.asarray(out["confusion_matrix"])
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise DataError(f"confusion_matrix must be square (C, C), got shape {cm.shape}")
        sizes["confusion_matrix"] = cm.shape[0]
    if len(set(sizes.values())) > 1:
        raise DataError(f"class_names, per_class and confusion_matrix disagree on C: {sizes}")
    return out


# --- Markdown ---------------------------------------------------------------------------------


def _metrics_table(metrics: Mapping) -> list[str]:
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    return lines


def _per_class_table(result: Mapping) -> list[str]:
    acc = result["per_class"]
    names = _class_names(result, len(acc))
    cm = result.get("confusion_matrix")
    support = [sum(row) for row in cm] if cm is not None else None
    head = "| class | accuracy | samples |" if support else "| class | accuracy |"
    lines = [head, "|---|---:|---:|" if support else "|---|---:|"]
    for i, (n, a) in enumerate(zip(names, acc)):
        cells = [n, _fmt(a)] + ([str(support[i])] if support else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_clip_benchmark_files(results: Sequence[Mapping], folder: Path) -> list[Path]:
    """One JSON object per result, as `clip_benchmark eval` dumps it (dataset, model, pretrained,
    task, metrics, language; classnames when known), named by its `--output` template, so that
    `clip_benchmark build FOLDER` tabulates our evaluations beside its own."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        dump = {"dataset": r["dataset"], "model": r["model"], "pretrained": r.get("pretrained", "mlxclip"),
                "task": r["task"], "metrics": {k: v for k, v in r["metrics"].items() if v is None or _is_number(v)},
                "language": r.get("language", "en")}
        if r.get("class_names"):
            dump["classnames"] = list(r["class_names"])
        if r.get("role"):
            dump["role"] = r["role"]
        name = "_".join(_slug(str(dump[k])) for k in ("dataset", "pretrained", "model", "language", "task"))
        path = folder / f"{name}.json"
        _write_json(dump, path)
        written.append(path)
    return written


def _report_figures(result: Mapping) -> list[tuple[str, Any]]:
    """(file suffix, plot function) for each figure `result` has the data for."""
    figures = []
    if result.get("confusion_matrix") is not None:
        figures.append(("confusion", _plot_confusion))
    if result.get("per_class") is not None:
        figures.append(("per_class", _plot_per_class))
    if result.get("task") == "zeroshot_retrieval" and any(_recall_at_k(result).values()):
        figures.append(("recall", _plot_recall))
    return figures


def write_report(results: Sequence[Mapping], out_json: Path) -> ReportFiles:
    """Write `out_json` (a list of result dicts), `<stem>.md` beside it and one PNG per figure."""
    out_json = Path(out_json)
    if not results:
        raise DataError("write_report needs at least one result")
    results = [_plain(r) for r in results]
    for i, r in enumerate(results):
        missing = [k for k in ("dataset", "model", "task", "metrics") if k not in r]
        if missing:
            raise DataError(f"results[{i}] lacks {missing}; build it with results_json()")
    _write_json(results, out_json)
    write_clip_benchmark_files(results, out_json.with_name(f"{out_json.stem}-clip_benchmark"))

    figures: list[Path] = []
    md = [f"# Evaluation report: {out_json.stem}", ""]
    for i, r in enumerate(results):
        md += [f"## {_title(r)}", "", *_metrics_table(r["metrics"]), ""]
        stem = f"{out_json.stem}-{i}-{_slug(r['dataset'])}-{_slug(r['model'])}"
        for kind, plot in _report_figures(r):
            png = out_json.with_name(f"{stem}-{kind}.png")
            plot(r, png)
            figures.append(png)
            md += [f"![{kind.replace('_', ' ')}: {_title(r)}]({png.name})", ""]
            if kind == "recall" and _recall_note(r):
                md += [f"Recall@K curve: {_recall_note(r)}.", ""]
        if r.get("per_class") is not None:
            md += ["### Per class", "", *_per_class_table(r), ""]
    markdown = out_json.with_suffix(".md")
    markdown.write_text("\n".join(md))
    return ReportFiles(out_json, markdown, tuple(figures))


# --- base vs fine-tuned -----------------------------------------------------------------------


def _deltas(base: Mapping, tuned: Mapping) -> dict[str, float]:
    return {k: tuned[k] - base[k] for k in base
            if k in tuned and _is_number(base[k]) and _is_number(tuned[k])}


def compare_table(base: Mapping, finetuned: Mapping) -> str:
    """Markdown table, metric by metric: base, fine-tuned, fine-tuned − base.

    Takes result dicts (or bare metrics dicts). Metrics present on one side only show "—".
    """
    for key in ("dataset", "task"):
        if key in base and key in finetuned and base[key] != finetuned[key]:
            raise DataError(f"cannot compare results with different {key}: "
                            f"{base[key]!r} vs {finetuned[key]!r}")
    b = _plain(_metrics_of(base, "base"))
    f = _plain(_metrics_of(finetuned, "finetuned"))
    delta = _deltas(b, f)
    lines = ["| metric | base | fine-tuned | Δ (fine-tuned − base) |", "|---|---:|---:|---:|"]
    for k in list(b) + [k for k in f if k not in b]:
        d = f"{delta[k]:+.4f}" if k in delta else "—"
        lines.append(f"| {k} | {_fmt(b[k]) if k in b else '—'} | "
                     f"{_fmt(f[k]) if k in f else '—'} | {d} |")
    return "\n".join(lines)



def _per_class_delta(base: Mapping, tuned: Mapping) -> dict[str, float | None]:
    """{class: fine-tuned − base accuracy}, in the base's class order; None where a side has no samples."""
    return {n: None if x is None or y is None else y - x for n, x, y in _per_class_pairs(base, tuned)}


def _moves_table(base: Mapping, tuned: Mapping, rows: int = _MOVES_ROWS) -> list[str]:
    """The classes the fine-tune moved most: the `rows` most improved and `rows` most hurt."""
    moves = _per_class_moves(base, tuned)
    row = "| {} | {:.4f} | {:.4f} | {:+.4f} |".format
    lines = ["| class | base | fine-tuned | Δ (fine-tuned − base) |", "|---|---:|---:|---:|"]
    if len(moves) <= 2 * rows:
        return lines + [row(*m) for m in moves]
    return lines + [row(*m) for m in moves[:rows]] + ["| … | | | |"] + [row(*m) for m in moves[-rows:]]


def write_comparison(base: Mapping, finetuned: Mapping, out_json: Path) -> ReportFiles:
    """Write {"base", "finetuned", "delta"} JSON, a Markdown table and a grouped bar chart; when
    both results carry `per_class`, also "per_class_delta" ({class: fine-tuned − base}), a table
    of the classes moved most and `<stem>-per_class.png`. Classes are matched by name."""
    out_json = Path(out_json)
    table = compare_table(base, finetuned)
    b, f = _plain(base), _plain(finetuned)
    bm, fm = _metrics_of(b, "base"), _metrics_of(f, "finetuned")
    per_class = b.get("per_class") is not None and f.get("per_class") is not None
    data = {"base": b, "finetuned": f, "delta": _deltas(bm, fm)}
    if per_class:
        data["per_class_delta"] = _per_class_delta(b, f)  # refuses mismatched classes before any file
    _write_json(data, out_json)
    title = f"Base vs fine-tuned: {b.get('dataset', '')} {b.get('task', '')}".strip()
    png = out_json.with_suffix(".png")
    _comparison_figure(bm, fm, title).savefig(png, dpi=110)
    models = f"base = `{b.get('model', 'base')}`, fine-tuned = `{f.get('model', 'fine-tuned')}`"
    md = [f"# {title}", "", models, "", table, "", f"![{title}]({png.name})", ""]
    figures = [png]
    if per_class:
        figures.append(out_json.with_name(f"{out_json.stem}-per_class.png"))
        _plot_per_class_compare(b, f, title, figures[-1])
        note = _per_class_note(b, f, 2 * _MOVES_ROWS)
        md += ["## Per class: the largest moves", "", *([f"{note[0].upper()}{note[1:]}.", ""] if note else []),
               *_moves_table(b, f), "", f"![per class: {title}]({figures[-1].name})", ""]
    markdown = out_json.with_suffix(".md")
    markdown.write_text("\n".join(md))
    return ReportFiles(out_json, markdown, tuple(figures))