"""The domain-shift case's report: OUT/domain_shift.json (every figure), .md (the tables the
README quotes) and .png (the WiSE-FT curve per alpha, and every model in the target/control
plane, the classic picture of Wortsman et al. 2022, fig. 1)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from mlx_clip.evaluation.figures import figure

LABELS = {"base": "base (stage A)", "fine-tune": "fine-tune", "wise-ft": "WiSE-FT", "lp-ft": "LP-FT",
          "l2-sp": "L2-SP"}


def _pct(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _delta(x: float) -> str:
    return f"{x:+.3f}"


def markdown(result, preset) -> str:
    base = result.row("base")
    a = result.stage_a
    lines = [
        "# Domain shift: forgetting, and what each guard gives back", "",
        f"Preset `{result.preset}`, {result.backend} engine, seed {result.seed}. Domain A: coloured shapes "
        f"(12 classes); domain B: stripes and dots in four other colours (16 classes); {preset.image_size} px, "
        f"{preset.per_class_train} training and {preset.per_class_val} held-out images per class. "
        "Accuracies are zero-shot top-1 on held-out images.", "",
        f"**Stage A** ({preset.stage_a['steps']} steps from random weights on A): A top-1 {_pct(a['a_before'])} → "
        f"**{_pct(a['a_after'])}** (B, never seen: {_pct(a['b_before'])}). This model is the base.", "",
        f"**Stage B** ({preset.stage_b['steps']} steps on B, lr {preset.stage_b['lr']:g}, same data order and seed for "
        f"every row): target = B, control = A. Forgetting budget: control may fall {result.budget:g} below the "
        f"base's {_pct(base.control)}.", "",
        "| model | target B top-1 | target gain | control A top-1 | control change | within budget | setting |",
        "|---|---:|---:|---:|---:|:---:|---|",
    ]
    for r in result.rows:
        if r.name == "base":
            lines.append(f"| {LABELS[r.name]} | {_pct(r.target)} | — | {_pct(r.control)} | — | — | {r.note} |")
            continue
        drop = base.control - r.control
        ok = "yes" if drop <= result.budget + 1e-9 else "no"
        lines.append(f"| {LABELS[r.name]} | {_pct(r.target)} | {_delta(r.target - base.target)} | {_pct(r.control)} "
                     f"| {_delta(r.control - base.control)} | {ok} | {r.note} |")
    if result.wise_ft["best_alpha"] is None:
        lines += ["", f"WiSE-FT: {result.wise_ft['message']}."]
    lines += ["", "L2-SP, one run per lambda (the chosen one is in the table above):", "",
              "| lambda | target B top-1 | control A top-1 | within budget |", "|---:|---:|---:|:---:|"]
    for q in result.l2_sp["points"]:
        mark = " **(chosen)**" if q["lambda"] == result.l2_sp["chosen"] else ""
        ok = "yes" if base.control - q["control"] <= result.budget + 1e-9 else "no"
        lines.append(f"| {q['lambda']:g}{mark} | {_pct(q['target'])} | {_pct(q['control'])} | {ok} |")
    lines += ["", "WiSE-FT sweep (base ↔ fine-tune):", "",
              "| alpha | target B top-1 | control A top-1 |", "|---:|---:|---:|"]
    for pt in result.wise_ft["points"]:
        mark = " **(chosen)**" if pt["alpha"] == result.wise_ft["best_alpha"] else ""
        lines.append(f"| {pt['alpha']:g}{mark} | {_pct(pt['target']['acc1'])} | {_pct(pt['control']['acc1'])} |")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items() if k != "total")
    lines += ["", f"Run time {result.seconds['total']:.0f} s ({times}).", "", "![domain shift](domain_shift.png)", ""]
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    fig = figure(11, 4.5)
    left, right = fig.subplots(1, 2)
    pts = result.wise_ft["points"]
    alphas = [p["alpha"] for p in pts]
    target = [p["target"]["acc1"] for p in pts]
    control = [p["control"]["acc1"] for p in pts]
    floor = result.row("base").control - result.budget
    best = result.wise_ft["best_alpha"]
    left.plot(alphas, target, "o-", label="target B")
    left.plot(alphas, control, "s-", label="control A")
    left.axhline(floor, color="gray", linestyle="--", label=f"control floor (budget {result.budget:g})")
    if best is not None:
        left.axvline(best, color="tab:red", linestyle=":", label=f"chosen alpha {best:g}")
    left.set(xlabel="alpha (0 = base, 1 = fine-tuned)", ylabel="zero-shot top-1", title="WiSE-FT sweep",
             ylim=(-0.02, 1.02))
    left.legend(fontsize=8)
    right.plot(target, control, "-", color="tab:gray", alpha=0.6, label="WiSE-FT curve")
    l2 = result.l2_sp["points"]
    right.plot([q["target"] for q in l2], [q["control"] for q in l2], ":", color="tab:purple", alpha=0.6,
               label="L2-SP, lambda " + ", ".join(f"{q['lambda']:g}" for q in l2))
    markers = {"base": "o", "fine-tune": "X", "wise-ft": "*", "lp-ft": "^", "l2-sp": "D"}
    for r in result.rows:
        right.scatter([r.target], [r.control], marker=markers[r.name], s=90, label=LABELS[r.name], zorder=3)
    right.axhline(floor, color="gray", linestyle="--")
    right.set(xlabel="target B top-1", ylabel="control A top-1", title="Target gain vs forgetting",
              xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    right.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)


def write_shift_report(result, out: Path, preset) -> dict[str, str]:
    out = Path(out)
    files = {"json": out / "domain_shift.json", "markdown": out / "domain_shift.md", "png": out / "domain_shift.png"}
    plot(result, files["png"])
    files["markdown"].write_text(markdown(result, preset))
    data = {**asdict(result), "status": "complete", "preset_options": asdict(preset),
            "files": {k: str(v) for k, v in files.items()}}
    files["json"].write_text(json.dumps(data, indent=2) + "\n")
    return {k: str(v) for k, v in files.items()}
