"""The WiSE-FT curve report: target and control scores per mixing coefficient alpha, the alpha
chosen under a control floor, written as JSON, a Markdown table and a PNG curve.

The JSON and number helpers are evaluation's report writers' (mlx_clip.evaluation.results) and the
canvas is its figures' (mlx_clip.evaluation.figures), so this report reads and looks like the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlx_clip.errors import DataError
from mlx_clip.evaluation.figures import figure
from mlx_clip.evaluation.results import ReportFiles, _is_number, _metrics_of, _plain, _write_json

__all__ = ["WiseFtReport", "wise_ft_curve_report"]


@dataclass(frozen=True)
class WiseFtReport:
    best_alpha: float | None  # None when no alpha keeps the control metric at the floor
    message: str
    files: ReportFiles


def _curve_points(points: Sequence[Mapping], metric: str) -> list[dict]:
    if not points:
        raise DataError("wise_ft_curve_report needs at least one point")
    out = []
    for i, p in enumerate(points):
        if not isinstance(p, Mapping) or "alpha" not in p:
            raise DataError(f"points[{i}] must be a dict with 'alpha', 'target' and 'control'")
        row = {"alpha": float(p["alpha"])}
        for side in ("target", "control"):
            m = _metrics_of(p.get(side), f"points[{i}]['{side}']")
            if not _is_number(_plain(m.get(metric))):
                raise DataError(f"points[{i}]['{side}'] has no numeric {metric!r}")
            row[side] = _plain(m)
        out.append(row)
    alphas = [r["alpha"] for r in out]
    if len(set(alphas)) != len(alphas):
        raise DataError(f"points repeat an alpha: {sorted(alphas)}")
    return sorted(out, key=lambda r: r["alpha"])


def _choose_alpha(pts: list[dict], metric: str, floor: float | None) -> tuple[dict | None, str]:
    ok = [p for p in pts if floor is None or p["control"][metric] >= floor]
    if not ok:
        best_c = max(pts, key=lambda p: p["control"][metric])
        return None, (f"no alpha keeps control {metric} >= {floor:.4f}: the highest control "
                      f"{metric} is {best_c['control'][metric]:.4f} at alpha {best_c['alpha']:g}")
    # Equal target scores: the smaller alpha, i.e. the one closer to the zero-shot weights.
    best = max(ok, key=lambda p: (p["target"][metric], -p["alpha"]))
    rule = "" if floor is None else f" among alphas with control {metric} >= {floor:.4f}"
    return best, (f"best alpha {best['alpha']:g}: target {metric} {best['target'][metric]:.4f}, "
                  f"control {metric} {best['control'][metric]:.4f}{rule}")


def _plot_curve(pts: list[dict], metric: str, floor: float | None, best: dict | None,
                path: Path) -> None:
    fig = figure(7, 4.5)
    ax = fig.add_subplot()
    a = [p["alpha"] for p in pts]
    ax.plot(a, [p["target"][metric] for p in pts], "o-", label=f"target (fine-tune domain) {metric}")
    ax.plot(a, [p["control"][metric] for p in pts], "s-", label=f"control (held-out) {metric}")
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label=f"control floor {floor:.3f}")
    if best is not None:
        ax.axvline(best["alpha"], color="tab:red", linestyle=":", label=f"chosen alpha {best['alpha']:g}")
    ax.set_xlabel("alpha (0 = zero-shot weights, 1 = fine-tuned weights)")
    ax.set_ylabel(metric)
    ax.set_title("WiSE-FT weight interpolation")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def wise_ft_curve_report(
    points: Sequence[Mapping],
    out_json: Path,
    control_floor: float | None = None,
    *,
    metric: str = "acc1",
) -> WiseFtReport:
    """Target and control `metric` per WiSE-FT alpha -> JSON, Markdown and a PNG curve.

    The best alpha has the highest target score among those whose control score is >=
    `control_floor` (all alphas when no floor); ties go to the smaller alpha. When no alpha
    qualifies, `best_alpha` is None and the message says so.
    """
    out_json = Path(out_json)
    pts = _curve_points(points, metric)
    best, message = _choose_alpha(pts, metric, control_floor)
    _write_json({"metric": metric, "control_floor": _plain(control_floor), "points": pts,
                 "best_alpha": best["alpha"] if best else None, "message": message}, out_json)
    png = out_json.with_suffix(".png")
    _plot_curve(pts, metric, control_floor, best, png)
    md = ["# WiSE-FT: target vs control", "", message, "",
          f"| alpha | target {metric} | control {metric} | control >= floor |",
          "|---:|---:|---:|:---:|"]
    for p in pts:
        meets = "—" if control_floor is None else ("yes" if p["control"][metric] >= control_floor else "no")
        mark = " **(chosen)**" if best is p else ""
        md.append(f"| {p['alpha']:g}{mark} | {p['target'][metric]:.4f} | "
                  f"{p['control'][metric]:.4f} | {meets} |")
    md += ["", f"![WiSE-FT curve]({png.name})", ""]
    markdown = out_json.with_suffix(".md")
    markdown.write_text("\n".join(md))
    return WiseFtReport(best["alpha"] if best else None, message, ReportFiles(out_json, markdown, (png,)))
