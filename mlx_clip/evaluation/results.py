"""Evaluation results as files a person can read: JSON, a Markdown summary, PNG figures.

Holds one evaluation's report (`results_json`, `write_report`, CLIP_benchmark's per-result files)
and the base vs fine-tuned comparison (`compare_table`, `write_comparison`). Its value, JSON and
figure helpers (`_plain`, `_write_json`, `_metrics_of`, `_figure`, ...) are shared by the other
reports: the WiSE-FT curve (mlx_clip.robust.wise_ft_report) and the training run's figures.

Result dicts are shaped like CLIP_benchmark's output (`{"dataset", "model", "task", "metrics"}`),
so its tooling reads ours. JSON is strict: NaN (a class without samples, a metric that does not
apply, such as acc5 over 5 classes or fewer, where CLIP_benchmark writes NaN) is written as null,
and shown as "n/a" in Markdown and figures; "—" marks a metric one side of a comparison lacks.
Figures are drawn on matplotlib's Agg canvas through the object API, which
leaves the process's pyplot backend alone.
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

__all__ = [
    "TASKS",
    "ReportFiles",
    "compare_table",
    "results_json",
    "write_comparison",
    "write_report",
]

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
_MAX_TICK_LABELS = 50  # beyond this, class names on a heatmap axis overlap into a black band
_MAX_BARS = 60  # beyond this, the per-class chart shows the worst classes only


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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


def _metrics_of(d: Mapping, name: str) -> Mapping:
    """A result dict's "metrics", or the dict itself when it is already a metrics dict."""
    if not isinstance(d, Mapping):
        raise DataError(f"{name} must be a dict of metrics, got {type(d).__name__}")
    m = d.get("metrics", d)
    if not isinstance(m, Mapping):
        raise DataError(f"{name}['metrics'] must be a dict, got {type(m).__name__}")
    return m


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


def _class_names(result: Mapping, c: int) -> list[str]:
    return [str(n) for n in result.get("class_names") or [f"class {i}" for i in range(c)]]


def _title(result: Mapping) -> str:
    return f"{result['dataset']} · {result['model']} · {result['task']}"


# --- figures ----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_confusion(result: Mapping, path: Path) -> None:
    cm = np.asarray(result["confusion_matrix"], dtype=np.int64)
    c = cm.shape[0]
    names = _class_names(result, c)
    support = cm.sum(axis=1, keepdims=True)
    # Colour by share of the true class so rare classes are as visible as common ones.
    share = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    side = min(4 + 0.35 * c, 20)
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class's samples")
    if c <= _MAX_TICK_LABELS:
        ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(c), [f"{n} (n={k})" for n, k in zip(names, support[:, 0])], fontsize=8)
    if c <= 20:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (counts)\n{_title(result)}")
    fig.savefig(path, dpi=110)


def _plot_per_class(result: Mapping, path: Path) -> None:
    acc = np.array([np.nan if v is None else v for v in result["per_class"]], dtype=float)
    names = np.array(_class_names(result, len(acc)))
    keep = np.nonzero(~np.isnan(acc))[0]
    note = ""
    if len(keep) < len(acc):
        note = f"; {len(acc) - len(keep)} classes without samples left out"
    if len(keep) > _MAX_BARS:
        keep = keep[np.argsort(acc[keep], kind="stable")[:_MAX_BARS]]
        note += f"; the {_MAX_BARS} lowest shown"
    keep = keep[::-1]  # barh draws bottom-up: first class on top
    fig = _figure(8, 1.5 + 0.28 * max(len(keep), 1))
    ax = fig.add_subplot()
    ax.barh(range(len(keep)), acc[keep], color="tab:blue")
    ax.set_yticks(range(len(keep)), names[keep], fontsize=8)
    mean = float(np.nanmean(acc)) if len(keep) else float("nan")
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean per-class recall {mean:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 accuracy within the class (recall)")
    ax.set_title(f"Per-class accuracy{note}\n{_title(result)}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)


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
        for key, kind, plot in (("confusion_matrix", "confusion", _plot_confusion),
                                ("per_class", "per_class", _plot_per_class)):
            if r.get(key) is not None:
                png = out_json.with_name(f"{stem}-{kind}.png")
                plot(r, png)
                figures.append(png)
                md += [f"![{kind.replace('_', ' ')}: {_title(r)}]({png.name})", ""]
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


def _comparison_figure(b: Mapping, f: Mapping, title: str):
    """Grouped bars per metric; a metric that is n/a (None) on a side gets "n/a" in place of its bar."""
    def score(v: Any) -> bool:  # only scores on a 0..1 scale share one axis (accuracies, recalls)
        return _is_number(v) and 0 <= v <= 1

    keys = [k for k in b if k in f and all(score(v) or v is None for v in (b[k], f[k]))]
    fig = _figure(max(6, 1.1 * len(keys) + 2), 4.5)
    ax = fig.add_subplot()
    for side, values, dx in (("base", b, -0.2), ("fine-tuned", f, 0.2)):
        shown = [i for i, k in enumerate(keys) if values[k] is not None]
        ax.bar([i + dx for i in shown], [values[keys[i]] for i in shown], 0.4, label=side,
               color="tab:blue" if side == "base" else "tab:orange")
    for i, k in enumerate(keys):
        missing = [dx for dx, v in ((-0.2, b[k]), (0.2, f[k])) if v is None]
        for dx in ([0.0] if len(missing) == 2 else missing):
            ax.text(i + dx, 0.02, "n/a", ha="center", va="bottom", color="gray")
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    return fig


def write_comparison(base: Mapping, finetuned: Mapping, out_json: Path) -> ReportFiles:
    """Write {"base", "finetuned", "delta"} JSON, a Markdown table and a grouped bar chart."""
    out_json = Path(out_json)
    table = compare_table(base, finetuned)
    b, f = _plain(base), _plain(finetuned)
    bm, fm = _metrics_of(b, "base"), _metrics_of(f, "finetuned")
    _write_json({"base": b, "finetuned": f, "delta": _deltas(bm, fm)}, out_json)
    title = f"Base vs fine-tuned: {b.get('dataset', '')} {b.get('task', '')}".strip()
    png = out_json.with_suffix(".png")
    _comparison_figure(bm, fm, title).savefig(png, dpi=110)
    models = f"base = `{b.get('model', 'base')}`, fine-tuned = `{f.get('model', 'fine-tuned')}`"
    md = [f"# {title}", "", models, "", table, "", f"![{title}]({png.name})", ""]
    markdown = out_json.with_suffix(".md")
    markdown.write_text("\n".join(md))
    return ReportFiles(out_json, markdown, (png,))
