"""Evaluation figures: confusion matrix, per-class accuracy, retrieval recall@K against K, and the
base vs fine-tuned comparison (the metrics side by side; for zero-shot, each class's accuracy on
both sides ordered by the change). `figure` is the blank canvas every report draws on, the training
run's and the WiSE-FT curve's too.

Figures are drawn on matplotlib's Agg canvas through the object API (`Figure` + `FigureCanvasAgg`,
never pyplot), so writing a report leaves the process's pyplot backend alone: a notebook or a GUI
that imported us keeps its own. matplotlib is imported only when a figure is drawn.

This module also holds the small readers of result dicts that the figures and the JSON/Markdown
writers (mlx_clip.evaluation.results, which imports them from here) both use: the recall@K points
and the per-class matching by class name, so a table and its figure show the same values.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clip.errors import DataError

_MAX_TICK_LABELS = 50  # beyond this, class names on a heatmap axis overlap into a black band
_MAX_BARS = 60  # beyond this, the per-class chart shows the worst classes only
_MAX_MOVES = 50  # beyond this, the base-vs-fine-tuned per-class chart shows the extremes only
_RECALL_KEY = re.compile(r"^(image|text)_retrieval_recall@(\d+)$")
_RECALL_SIDES = {"image": "image retrieval (caption → image)", "text": "text retrieval (image → caption)"}


# --- reading result dicts ---------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_or_none(v: Any) -> float | None:
    return float(v) if _is_number(v) and math.isfinite(v) else None


def _metrics_of(d: Mapping, name: str) -> Mapping:
    """A result dict's "metrics", or the dict itself when it is already a metrics dict."""
    if not isinstance(d, Mapping):
        raise DataError(f"{name} must be a dict of metrics, got {type(d).__name__}")
    m = d.get("metrics", d)
    if not isinstance(m, Mapping):
        raise DataError(f"{name}['metrics'] must be a dict, got {type(m).__name__}")
    return m


def _class_names(result: Mapping, c: int) -> list[str]:
    return [str(n) for n in result.get("class_names") or [f"class {i}" for i in range(c)]]


def _title(result: Mapping) -> str:
    return f"{result['dataset']} · {result['model']} · {result['task']}"


# --- one result -------------------------------------------------------------------------------


def figure(width: float, height: float):
    """A blank figure on its own Agg canvas, laid out with constrained layout; `fig.savefig` writes it."""
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
    fig = figure(side + 1.5, side)
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
    fig = figure(8, 1.5 + 0.28 * max(len(keep), 1))
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


def _recall_at_k(result: Mapping) -> dict[str, dict[int, float | None]]:
    """{"image": {K: recall}, "text": {K: recall}} from a retrieval result's metrics, K ascending;
    None where recall@K does not apply (K reaches every candidate: NaN in the metrics)."""
    found: dict[str, dict[int, float | None]] = {side: {} for side in _RECALL_SIDES}
    for key, v in _metrics_of(result, "result").items():
        m = _RECALL_KEY.match(key)
        if m:
            found[m[1]][int(m[2])] = _finite_or_none(v)
    return {side: dict(sorted(ks.items())) for side, ks in found.items()}


def _recall_series(result: Mapping) -> dict[str, list[tuple[int, float]]]:
    """The points the recall@K curve draws: per side, (K, recall) for every K that has a value."""
    return {side: [(k, v) for k, v in ks.items() if v is not None]
            for side, ks in _recall_at_k(result).items()}


def _recall_note(result: Mapping) -> str:
    """Which recall@K are n/a and so left out of the curve ("" when none)."""
    gaps = [f"{side} @" + ", @".join(str(k) for k, v in ks.items() if v is None)
            for side, ks in _recall_at_k(result).items() if None in ks.values()]
    return f"n/a (K reaches every candidate), left out: {'; '.join(gaps)}" if gaps else ""


def _plot_recall(result: Mapping, path: Path):
    from matplotlib.ticker import NullLocator

    at_k, series = _recall_at_k(result), _recall_series(result)
    ks = sorted({k for side in at_k.values() for k in side})
    fig = figure(7, 4.8)
    ax = fig.add_subplot()
    for (side, label), colour, marker in zip(_RECALL_SIDES.items(), ("tab:blue", "tab:orange"), ("o", "s")):
        if series[side]:
            x, y = zip(*series[side])
            ax.plot(x, y, marker=marker, color=colour, lw=1.5, label=label)
            other = at_k["text" if side == "image" else "image"]
            for k, v in series[side]:
                # The value's label goes on the side away from the other curve, so both stay legible.
                up = other.get(k) is None or v > other[k] or (v == other[k] and side == "image")
                ax.annotate(f"{v:.2f}", (k, v), textcoords="offset points", xytext=(0, 7 if up else -13),
                            ha="center", fontsize=8, color=colour)
    if not any(series.values()):
        ax.text(0.5, 0.5, "no recall@K applies", transform=ax.transAxes, ha="center", color="gray")
    else:
        ax.legend(loc="lower right", fontsize=8)
    # K = 1, 5, 10, ... spread over decades: a log axis spaces them evenly; ticks only at the Ks.
    ax.set_xscale("log")
    ax.set_xlim(ks[0] / 1.6, ks[-1] * 1.6)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("K (log scale)")
    ax.set_ylabel("recall@K (share of queries with a match in the top K)")
    ax.grid(alpha=0.3)
    counts = ", ".join(f"{result[k]} {k}" for k in ("images", "captions") if _is_number(result.get(k)))
    note = _recall_note(result)
    ax.set_title("Retrieval recall@K" + (f" ({counts})" if counts else "") + f"\n{_title(result)}"
                 + (f"\n{note}" if note else ""), fontsize=10)
    fig.savefig(path, dpi=110)
    return fig  # for a caller (a test) that inspects what was drawn


# --- base vs fine-tuned -----------------------------------------------------------------------


def _comparison_figure(b: Mapping, f: Mapping, title: str):
    """Grouped bars per metric; a metric that is n/a (None) on a side gets "n/a" in place of its bar."""
    def score(v: Any) -> bool:  # only scores on a 0..1 scale share one axis (accuracies, recalls)
        return _is_number(v) and 0 <= v <= 1

    keys = [k for k in b if k in f and all(score(v) or v is None for v in (b[k], f[k]))]
    fig = figure(max(6, 1.1 * len(keys) + 2), 4.5)
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


def _abbrev(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', … ({len(names)} in all)' if len(names) > limit else ''}]"


def _per_class_pairs(base: Mapping, tuned: Mapping) -> list[tuple[str, float | None, float | None]]:
    """(class, base accuracy, fine-tuned accuracy) in the base's class order, classes matched by
    name (None: the class had no samples). Refuses two results whose class names differ."""
    sides = []
    for result, side in ((base, "base"), (tuned, "fine-tuned")):
        acc = result["per_class"]
        names = _class_names(result, len(acc))
        if len(names) != len(acc):
            raise DataError(f"{side}: {len(names)} class names for {len(acc)} per-class accuracies")
        repeated = sorted(n for n, k in Counter(names).items() if k > 1)
        if repeated:
            raise DataError(f"{side}: class names repeat ({repeated[:5]}), so classes cannot be matched by name")
        sides.append((names, dict(zip(names, acc))))
    (b_names, b), (f_names, f) = sides
    if set(b_names) != set(f_names):
        raise DataError(
            "cannot compare per-class accuracy: the class names differ "
            f"(only in base: {_abbrev([n for n in b_names if n not in f])}, "
            f"only in fine-tuned: {_abbrev([n for n in f_names if n not in b])}); "
            f"base classes {_abbrev(b_names)}, fine-tuned classes {_abbrev(f_names)}")
    return [(n, _finite_or_none(b[n]), _finite_or_none(f[n])) for n in b_names]


def _per_class_moves(base: Mapping, tuned: Mapping) -> list[tuple[str, float, float, float]]:
    """(class, base, fine-tuned, delta) for the classes with an accuracy on both sides, most
    improved first and most hurt last (ties keep the class order)."""
    moves = [(n, x, y, y - x) for n, x, y in _per_class_pairs(base, tuned) if x is not None and y is not None]
    return sorted(moves, key=lambda m: -m[3])


def _extremes(moves: list, limit: int) -> list:
    """All of `moves` up to `limit`; past it, the limit/2 first (most improved) and last (most hurt)."""
    return moves if len(moves) <= limit else moves[:limit // 2] + moves[-(limit // 2):]


def _per_class_note(base: Mapping, tuned: Mapping, limit: int = _MAX_MOVES) -> str:
    total, moves = len(_per_class_pairs(base, tuned)), _per_class_moves(base, tuned)
    notes = []
    if len(moves) < total:
        k = total - len(moves)
        notes.append(f"{k} class{'es' if k > 1 else ''} without samples on a side left out")
    if len(moves) > limit:
        notes.append(f"the {limit // 2} most improved and {limit // 2} most hurt of {len(moves)} shown")
    return "; ".join(notes)


def _plot_per_class_compare(base: Mapping, tuned: Mapping, title: str, path: Path):
    moves = _per_class_moves(base, tuned)
    shown = _extremes(moves, _MAX_MOVES)
    n = len(shown)
    y = np.arange(n)[::-1]  # barh counts bottom-up: the most improved class on top
    fig = figure(8, 2.2 + 0.34 * max(n, 1))
    ax = fig.add_subplot()
    ax.barh(y + 0.2, [m[1] for m in shown], 0.4, color="tab:blue", label="base")
    ax.barh(y - 0.2, [m[2] for m in shown], 0.4, color="tab:orange", label="fine-tuned")
    ax.set_yticks(y, [f"{m[0]} ({m[3]:+.2f})" for m in shown], fontsize=8)
    for label, m in zip(ax.get_yticklabels(), shown):
        label.set_color("tab:green" if m[3] > 0 else "tab:red" if m[3] < 0 else "black")
    if not shown:
        ax.text(0.5, 0.5, "no class has samples on both sides", transform=ax.transAxes, ha="center", color="gray")
    if len(shown) < len(moves):
        gap = n - _MAX_MOVES // 2 - 0.5
        ax.axhline(gap, color="gray", linestyle="--", lw=1)
        ax.text(0.5, gap, f"{len(moves) - n} classes in between not shown", ha="center", va="center",
                fontsize=8, color="gray", backgroundcolor="white")
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 accuracy within the class (recall)")
    ax.set_ylabel("class (fine-tuned − base), most improved on top")
    note = _per_class_note(base, tuned)
    ax.set_title(f"{title}, per-class accuracy" + (f"\n{note}" if note else ""), fontsize=10)
    fig.legend(loc="outside upper center", ncols=2, fontsize=8)
    fig.savefig(path, dpi=110)
    return fig  # for a caller (a test) that inspects what was drawn
