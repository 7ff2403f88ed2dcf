"""`python -m mlx_clip.benchmarks.recipes`: what each training recipe does on the built-in
domain-shift case (`mlxclip demo domain-shift`): the target it reaches and what it costs the base.

Stage A's base (a random CLIP trained on domain A, the stand-in for a pretrained model; `--base`
reuses one, e.g. `runs/domain-shift/stage-a/final`) is fine-tuned on domain B once per recipe with
the case's stage-B options, data order and seed, on B's images with captions (a seeded template per
image filled with its class, as class-folder training makes them):

- plain; `--layer-decay 0.75`; `--ema-decay 0.99` (its `final-ema/`; 0.99 averages over ~100 of the
  200 steps); `--patch-dropout 0.5`;
- NegCLIP: the same captions plus hard negatives (`--negative-column`): the sentence with its colour
  word swapped for another of B's colours, and with its pattern word swapped.

The plain and NegCLIP fine-tunes are then swept with WiSE-FT. The figures are zero-shot top-1 on
held-out images of B (target) and A (control, what the base knew). NegCLIP reports that its hard
negatives cost some ImageNet accuracy; the sweep is the guard.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from mlx_clip.data.demo import CONTROL_COLOURS, PATTERNS
from mlx_clip.data.templates import DEFAULT_TEMPLATES, fill

NEGATIVES = "other_colour,other_pattern"


def captions_with_negatives(domain: Path, out: Path, seed: int) -> Path:
    """B's training images as a captions file: a seeded template per image filled with its class
    (as class-folder training does), and the same sentence with the colour, then the pattern,
    swapped for another of B's."""
    rng = np.random.default_rng(seed)
    colours = list(CONTROL_COLOURS)
    rows = []
    for folder in sorted(p for p in (domain / "train").iterdir() if p.is_dir()):
        colour, pattern = folder.name.split("_", 1)
        for image in sorted(folder.glob("*.png")):
            template = DEFAULT_TEMPLATES[int(rng.integers(len(DEFAULT_TEMPLATES)))]
            other_colour = colours[(colours.index(colour) + int(rng.integers(1, len(colours)))) % len(colours)]
            other_pattern = PATTERNS[(PATTERNS.index(pattern) + int(rng.integers(1, len(PATTERNS)))) % len(PATTERNS)]
            rows.append([str(image), fill(template, f"{colour}_{pattern}"), fill(template, f"{other_colour}_{pattern}"),
                         fill(template, f"{colour}_{other_pattern}")])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption", *NEGATIVES.split(",")])
        writer.writerows(rows)
    return out


RECIPES = {
    "plain": {},
    "layer-decay 0.75": {"layer_decay": 0.75},
    "ema 0.99": {"ema_decay": 0.99},
    "patch-dropout 0.5": {"patch_dropout": 0.5},
    "negclip": {"negative_column": NEGATIVES},
}
SWEPT = ("plain", "negclip")
MARKER = "recipes.json"


def refusal(out: Path, base: Path | None) -> str | None:
    """Why OUT cannot hold this run: each recipe's folder in it is replaced, so OUT must be new,
    empty, or an earlier run of this benchmark, and a given base must not lie in a folder replaced."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        return f"--out {out} is not empty and holds no {MARKER} of an earlier run of this benchmark; give a new folder"
    if base is not None:
        replaced = [out.resolve() / name.replace(" ", "-") for name in RECIPES]
        if any(base.resolve().is_relative_to(folder) for folder in replaced):
            return f"--base {base} lies in a folder this run replaces; copy it elsewhere first"
    return None


def run(out: Path, preset: str, backend: str, seed: int, base: Path | None, alphas: str | None,
        recipes: list[str]) -> dict:
    from mlx_clip.data.shift import make_shift_domains
    from mlx_clip.finetune import finetune
    from mlx_clip.model.builtin import cache_root
    from mlx_clip.robust.domain_shift import PRESETS
    from mlx_clip.robust.wise_ft import wise_ft_sweep
    from mlx_clip.training.options import TrainConfig

    p = PRESETS[preset]
    domains = make_shift_domains(cache_root() / "domain-shift" / f"{preset}-seed{seed}", image_size=p.image_size,
                                 per_class_train=p.per_class_train, per_class_val=p.per_class_val, seed=seed)
    seconds: dict[str, float] = {}

    def train(name: str, options: dict) -> Path:
        folder = out / name.replace(" ", "-")
        cfg = TrainConfig.resolve(None, {"backend": backend, "seed": seed, "out": str(folder), "overwrite": True,
                                         "evaluate": False, **options})
        tick = time.perf_counter()
        finetune(cfg, progress="lines", show_config=False)
        seconds[name] = time.perf_counter() - tick
        return folder / ("final-ema" if options.get("ema_decay") else "final")

    if base is None:
        base = train("stage-a", {**p.stage_a, "data": str(domains["a"])})
    pairs = captions_with_negatives(domains["b"], out / "b_captions.csv", seed)
    stage_b = {**p.stage_b, "model": str(base), "data": str(pairs), "val_fraction": 0.0}
    results = {}
    for name in recipes:
        model = train(name, {**stage_b, **RECIPES[name]})
        # alpha 0 is the base and 1 the fine-tune: a one-point "sweep" scores the fine-tune alone.
        sweep = wise_ft_sweep(base, model, (alphas or p.alphas) if name in SWEPT else "0,1", [str(domains["b_val"])],
                              [str(domains["a_val"])], backend=backend,
                              out_json=out / f"wise-ft-{name.replace(' ', '-')}" / "wise_ft.json")
        points = json.loads(sweep.files.json.read_text())["points"]
        results[name] = [{"alpha": q["alpha"], "target": q["target"]["acc1"], "control": q["control"]["acc1"]}
                         for q in points]
    return {"preset": preset, "backend": backend, "seed": seed, "base": str(base), "negatives": NEGATIVES,
            "recipes": {name: RECIPES[name] for name in recipes}, "stage_b": dict(p.stage_b), "sweeps": results,
            "seconds": seconds}


def markdown(result: dict, budget: float) -> str:
    sweeps = result["sweeps"]
    base = next(iter(sweeps.values()))[0]
    floor = base["control"] - budget
    lines = ["| model | target B | control A | control change |", "|---|---:|---:|---:|",
             f"| base | {base['target']:.3f} | {base['control']:.3f} | — |"]
    for name, points in sweeps.items():
        tuned = points[-1]
        lines.append(f"| {name} | {tuned['target']:.3f} | {tuned['control']:.3f} | "
                     f"{tuned['control'] - base['control']:+.3f} |")
        if name not in SWEPT:
            continue
        kept = [q for q in points if q["control"] >= floor - 1e-9]
        best = max(kept, key=lambda q: (q["target"], -q["alpha"]))
        lines.append(f"| {name}, WiSE-FT alpha {best['alpha']:g} (best within {budget:g}) | {best['target']:.3f} | "
                     f"{best['control']:.3f} | {best['control'] - base['control']:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from mlx_clip.robust.domain_shift import BUDGET

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--preset", default="default", choices=("default", "ci"))
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, help="stage A's model (default: train it as the case does)")
    parser.add_argument("--alphas", help="WiSE-FT sweep (default: the preset's)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.recipes.split(",")) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    problem = refusal(args.out, args.base)
    if problem:
        parser.error(problem)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MARKER).write_text(json.dumps({"status": "running"}) + "\n")
    result = run(args.out, args.preset, args.backend, args.seed, args.base, args.alphas, args.recipes.split(","))
    table = markdown(result, BUDGET)
    (args.out / "recipes.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "recipes.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
