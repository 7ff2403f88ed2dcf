"""WiSE-FT: interpolate zero-shot and fine-tuned weights, and sweep the mixing coefficient.

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (mlfoundations/wise-ft,
`src/wise_ft.py` `_merge`): theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1, every tensor.
alpha = 0 is the zero-shot model, 1 the fine-tuned one; in between, the target-domain gain of
fine-tuning is usually kept while accuracy on other domains (the control) comes back.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlx_clip.api import IMAGE_BATCH
from mlx_clip.outputs import move_into_place, staging_folder
from mlx_clip.errors import CheckpointError, ConfigError
from mlx_clip.outputs import check_folder, refuse_overlap

MAX_SWEEP_POINTS = 1001
_DECIMALS = 12  # sweep values are rounded here: 0.1 * 3 gives 0.3, not 0.30000000000000004


# --- alphas -----------------------------------------------------------------------------------


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be a number in [0, 1] (0 = zero-shot, 1 = fine-tuned), got {alpha!r}")
    return float(alpha)


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--sweep {spec!r}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"--sweep {spec!r}: {text.strip()!r} is not a finite number")
    return value


def parse_sweep(spec: str) -> list[float]:
    """`start:stop:step` (stop included when the steps reach it) or a comma list `0,0.5,1`.

    `parse_sweep("0:1:0.1") == [0.0, 0.1, ..., 1.0]`: values are computed as start + i * step and
    rounded to 12 decimals, so no accumulated error makes 1.0 fall out or 0.3 print as 0.300…04.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--sweep must be 'start:stop:step' or a comma list of alphas, got {spec!r}")
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ConfigError(f"--sweep {spec!r}: expected start:stop:step, e.g. 0:1:0.1")
        start, stop, step = (_number(p, spec) for p in parts)
        if step <= 0:
            raise ConfigError(f"--sweep {spec!r}: step must be > 0, got {step:g}")
        if stop < start:
            raise ConfigError(f"--sweep {spec!r}: stop {stop:g} is below start {start:g}")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_SWEEP_POINTS:
            raise ConfigError(f"--sweep {spec!r}: {count} points; at most {MAX_SWEEP_POINTS}")
        values = [round(start + i * step, _DECIMALS) for i in range(count)]
    else:
        values = [_number(p, spec) for p in spec.split(",")]
    for v in values:
        if not 0 <= v <= 1:
            raise ConfigError(f"--sweep {spec!r}: alpha {v:g} is outside [0, 1]")
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep {spec!r}: an alpha is repeated")
    return sorted(values)


# --- weights ----------------------------------------------------------------------------------


def interpolate_weights(zero_shot: Mapping[str, np.ndarray], fine_tuned: Mapping[str, np.ndarray],
                        alpha: float) -> dict[str, np.ndarray]:
    """(1 - alpha) * zero_shot + alpha * fine_tuned per tensor, computed in float32 and returned in
    the fine-tuned tensor's dtype. alpha 0 / 1 return the zero-shot / fine-tuned arrays' exact
    bytes (copies). Integer tensors (buffers) must be equal and are copied. Names and shapes must
    match: a difference raises CheckpointError naming the tensor."""
    alpha = check_alpha(alpha)
    missing = sorted(set(zero_shot) - set(fine_tuned))
    extra = sorted(set(fine_tuned) - set(zero_shot))
    if missing or extra:
        side, names = ("the fine-tuned", missing) if missing else ("the zero-shot", extra)
        raise CheckpointError(f"tensor {names[0]} is missing from {side} weights ({len(missing) + len(extra)} "
                              "name(s) differ); WiSE-FT needs two checkpoints of one architecture")
    w0, w1 = np.float32(1.0 - alpha), np.float32(alpha)
    out = {}
    for name in fine_tuned:
        t0, t1 = np.asarray(zero_shot[name]), np.asarray(fine_tuned[name])
        if t0.shape != t1.shape:
            raise CheckpointError(f"tensor {name} has shape {t0.shape} in the zero-shot weights and "
                                  f"{t1.shape} in the fine-tuned ones")
        if not np.issubdtype(t1.dtype, np.floating):
            if not np.array_equal(t0, t1):
                raise CheckpointError(f"tensor {name} ({t1.dtype}) differs between the checkpoints; "
                                      "only floating-point tensors can be interpolated")
            out[name] = t1.copy()
        elif alpha == 0.0:
            out[name] = t0.astype(t1.dtype, copy=True)
        elif alpha == 1.0:
            out[name] = t1.copy()
        else:
            mixed = w0 * t0.astype(np.float32, copy=False) + w1 * t1.astype(np.float32, copy=False)
            out[name] = mixed.astype(t1.dtype, copy=False)
    return out


def _architecture(config) -> dict:
    """The config fields that define the network (not names, dtypes or tooling extras)."""
    def fields(c):
        return {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "extras"}
    return {"projection_dim": config.projection_dim, "text": fields(config.text_config),
            "vision": fields(config.vision_config)}


def _check_same_architecture(c0, c1, where: tuple[Path, Path]) -> None:
    if c0.model_type != c1.model_type:
        raise CheckpointError(f"{where[0]} is a {c0.model_type} model and {where[1]} a {c1.model_type} model; "
                              "WiSE-FT interpolates two checkpoints of one model")
    a0, a1 = _architecture(c0), _architecture(c1)
    if a0 == a1:
        return
    for key in ("projection_dim", "text", "vision"):
        if a0[key] != a1[key]:
            if key == "projection_dim":
                diff = f"projection_dim {a0[key]} vs {a1[key]}"
            else:
                field = next(k for k in a0[key] if a0[key][k] != a1[key][k])
                diff = f"{key}_config.{field} {a0[key][field]!r} vs {a1[key][field]!r}"
            raise CheckpointError(f"{where[0]} and {where[1]} are different architectures ({diff}); "
                                  "WiSE-FT interpolates two checkpoints of one model")


def _read_pair(zero_shot_dir, fine_tuned_dir, allow_pickle: bool):
    from mlx_clip.convert import read_checkpoint

    c0 = read_checkpoint(zero_shot_dir, allow_pickle=allow_pickle)
    c1 = read_checkpoint(fine_tuned_dir, allow_pickle=allow_pickle)
    _check_same_architecture(c0.config, c1.config, (Path(zero_shot_dir), Path(fine_tuned_dir)))
    return c0, c1


def _write_folder(folder: Path, fine_tuned, zero_shot, weights: dict[str, np.ndarray]) -> Path:
    """An HF folder (config.json + model.safetensors, format=pt) in the fine-tuned tensors' stored
    dtypes (bf16 stays bf16), with tokenizer/preprocessor files from fine-tuned, else zero-shot."""
    from mlx_clip.convert.dtypes import cast, from_numpy
    from mlx_clip.convert.writer import SIDE_FILES, copy_side_files, write_stored

    stored = {n: cast(from_numpy(a), "bfloat16") if fine_tuned.dtypes.get(n) == "BF16" else from_numpy(a)
              for n, a in weights.items()}
    write_stored(folder, "hf", fine_tuned.config, stored)
    copy_side_files(fine_tuned.folder, folder)
    for name in SIDE_FILES:
        if not (folder / name).exists() and (zero_shot.folder / name).is_file():
            shutil.copy2(zero_shot.folder / name, folder / name)
    return folder


def wise_ft(zero_shot_dir: str | Path, fine_tuned_dir: str | Path, alpha: float, out_dir: str | Path, *,
            overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Write the WiSE-FT model for `alpha` as a Hugging Face folder that both engines load."""
    alpha = check_alpha(alpha)
    out_dir = Path(out_dir)
    refuse_overlap(out_dir, {"an input checkpoint (--zero-shot)": zero_shot_dir,
                             "an input checkpoint (--fine-tuned)": fine_tuned_dir})
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    check_folder(out_dir.parent)
    c0, c1 = _read_pair(zero_shot_dir, fine_tuned_dir, allow_pickle)
    # Written beside --out and renamed over it whole: no old file mixes into the new model, and a
    # failure leaves the old folder as it was.
    staging = staging_folder(out_dir)
    try:
        _write_folder(staging, c1, c0, interpolate_weights(c0.tensors, c1.tensors, alpha))
        move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def wise_ft_sweep(zero_shot_dir: str | Path, fine_tuned_dir: str | Path, alphas: Sequence[float] | str,
                  eval_target, eval_control, *, backend: str = "mlx", out_json: str | Path,
                  control_floor: float | None = None, templates=None, classes=None, batch_size: int = IMAGE_BATCH,
                  metric: str = "acc1", device: str | None = None, dtype: str | None = None,
                  allow_pickle: bool = False):
    """For each alpha: interpolate in memory, evaluate zero-shot on target and control, then write
    `wise_ft_report.wise_ft_curve_report` (JSON + Markdown + PNG) with the best alpha for `control_floor`.

    The engines load from folders, so each alpha's weights pass through one scratch folder
    (rewritten in place, deleted at the end); no checkpoint per alpha is kept.
    """
    from mlx_clip.api import load
    from mlx_clip.evaluation.evaluate import ZERO_SHOT, evaluate_clip, load_jobs
    from mlx_clip.robust.wise_ft_report import wise_ft_curve_report

    alphas = parse_sweep(alphas) if isinstance(alphas, str) else sorted(check_alpha(a) for a in alphas)
    if not alphas:
        raise ConfigError("the sweep needs at least one alpha")
    if control_floor is not None and not 0 <= control_floor <= 1:
        raise ConfigError(f"control_floor must be a score in [0, 1], got {control_floor!r}")
    # Each domain is scored by zero-shot accuracy; load_jobs refuses data without class folders.
    target = load_jobs(eval_target, templates=templates, classes=classes, tasks=[ZERO_SHOT])
    control = load_jobs(eval_control, templates=templates, tasks=[ZERO_SHOT])
    c0, c1 = _read_pair(zero_shot_dir, fine_tuned_dir, allow_pickle)
    points = []
    with tempfile.TemporaryDirectory(prefix="mlxclip-wiseft-") as scratch:
        for alpha in alphas:
            folder = _write_folder(Path(scratch), c1, c0, interpolate_weights(c0.tensors, c1.tensors, alpha))
            clip = load(folder, backend, device=device, dtype=dtype)
            name = f"wise-ft alpha={alpha:g}"
            scores = [evaluate_clip(clip, jobs, model_name=name, batch_size=batch_size)
                      for jobs in (target, control)]
            del clip
            points.append({"alpha": alpha, "target": _mean_scores(scores[0]),
                           "control": _mean_scores(scores[1])})
    return wise_ft_curve_report(points, Path(out_json), control_floor, metric=metric)


def _mean_scores(results: list[dict]) -> dict:
    """One domain's scores; several datasets of a role are averaged metric by metric."""
    keys = results[0]["metrics"].keys()
    out = {}
    for key in keys:
        values = [r["metrics"].get(key) for r in results]
        # None: a top-k that every guess reaches on a domain with k classes or fewer (not applicable).
        out[key] = None if any(v is None for v in values) else float(np.mean(values))
    return out
