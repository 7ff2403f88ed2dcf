"""Domain evaluation: score a dataset's embeddings (`encode.py`) as CLIP_benchmark does, report.

Class folders give zero-shot classification (prompt-ensembled, `metrics.build_class_embeds`) and,
when the folder holds a train/ split, a linear probe; captions files give image-text retrieval.
A control domain evaluated beside the target measures forgetting. Everything here is numpy over
the engine boundary.

Data that would score 1.0 whatever the model is refused before any model loads (fewer than 2
classes: `TooFewClassesError`; retrieval over one image: `DataError`), and a top-k or recall@K
that every guess reaches (k >= candidates) is NaN in the metrics, null in the result dicts and
JSON, "n/a" in Markdown and print.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from mlx_clip.api import CLIP, IMAGE_BATCH, TEXT_BATCH, load
from mlx_clip.data.records import Dataset, load_dataset, split_samples
from mlx_clip.data.sample import Sample
from mlx_clip.data.templates import DEFAULT_TEMPLATES, check_templates
from mlx_clip.errors import ConfigError, DataError
from mlx_clip.evaluation.encode import EncodedDataset, class_embeddings, encode_dataset
from mlx_clip.evaluation.metrics import TooFewClassesError  # noqa: F401  (re-exported: callers catch it from here)
from mlx_clip.evaluation.metrics import (
    check_num_classes,
    classification_metrics,
    confusion_matrix,
    linear_probe,
    per_class_accuracy,
    retrieval_recall_at_k,
    zero_shot_logits,
)
from mlx_clip.evaluation.results import ReportFiles, results_json, write_comparison, write_report

log = logging.getLogger(__name__)

ZERO_SHOT, RETRIEVAL, PROBE = "zeroshot_classification", "zeroshot_retrieval", "linear_probe"
TASK_ALIASES = {
    ZERO_SHOT: ZERO_SHOT, "zero_shot": ZERO_SHOT, "zeroshot": ZERO_SHOT, "classification": ZERO_SHOT,
    RETRIEVAL: RETRIEVAL, "retrieval": RETRIEVAL,
    PROBE: PROBE, "probe": PROBE,
}
TASK_LABELS = {ZERO_SHOT: "zero-shot classification", PROBE: "a linear probe", RETRIEVAL: "retrieval"}
RECALL_KS = (1, 5, 10)


# --- the three tasks --------------------------------------------------------------------------


def eval_samples(dataset: Dataset) -> list[Sample]:
    """The samples a dataset is scored on: its val/ split when it has one, else all of it."""
    return dataset.val if dataset.val is not None else dataset.samples


def _require(dataset: Dataset, kind: str, task: str) -> None:
    if dataset.kind != kind:
        layout = "class folders (ROOT/<class>/*.jpg)" if kind == "class_folders" else "a captions file"
        raise DataError(f"{dataset.source}: {task} needs {layout}, but this dataset is {dataset.kind}")


def check_classes(dataset: Dataset, task: str = ZERO_SHOT) -> None:
    """Raise `TooFewClassesError` (a DataError: `.source`, `.num_classes`) when `dataset` has
    fewer than 2 classes for zero-shot classification or a linear probe (`task`)."""
    check_num_classes(len(dataset.class_names or []), str(dataset.source), TASK_LABELS[task])


def _check_images(dataset: Dataset) -> None:
    """Retrieval over one image finds it for every caption: refuse before encoding anything."""
    samples = eval_samples(dataset)
    if samples and all(s.image_id == samples[0].image_id for s in samples):
        raise DataError(f"{dataset.source}: retrieval needs at least 2 images, got 1; with one, "
                        "every caption finds it whatever the model")


def _check_task(dataset: Dataset, task: str) -> None:
    if task == RETRIEVAL:
        _check_images(dataset)
    else:
        check_classes(dataset, task)


def _zero_shot_metrics(clip: CLIP, encoded: EncodedDataset, class_names: list[str],
                       templates: Sequence[str], *, text_batch_size: int = TEXT_BATCH) -> dict:
    if encoded.labels is None:
        raise DataError("zero-shot classification needs labelled samples (class folders)")
    logits = zero_shot_logits(encoded.image_embeds,
                              class_embeddings(clip, class_names, templates, batch_size=text_batch_size))
    out = classification_metrics(logits, encoded.labels, ks=(1, 5))
    out.update(per_class=per_class_accuracy(logits, encoded.labels).tolist(),
               confusion_matrix=confusion_matrix(logits, encoded.labels).tolist(),
               class_names=list(class_names), **encoded.report_extras())
    return out


def zero_shot(clip: CLIP, dataset: Dataset, templates: Sequence[str] | None = None, *,
              batch_size: int = IMAGE_BATCH) -> dict:
    """acc1, acc5, mean_per_class_recall (CLIP_benchmark's names) + per_class, confusion_matrix,
    class_names, images, unreadable_images. Templates default to the dataset's, then CLIP's.
    acc5 is NaN for 5 classes or fewer; fewer than 2 classes raise `TooFewClassesError`."""
    _require(dataset, "class_folders", "zero-shot classification")
    check_classes(dataset)
    templates = templates if templates is not None else dataset.templates or DEFAULT_TEMPLATES
    encoded = encode_dataset(clip, eval_samples(dataset), batch_size=batch_size, texts=False)
    return _zero_shot_metrics(clip, encoded, dataset.class_names, templates)


def retrieval(clip: CLIP, dataset: Dataset, *, ks: Sequence[int] = RECALL_KS,
              batch_size: int = IMAGE_BATCH) -> dict:
    """image_retrieval_recall@K and text_retrieval_recall@K, several captions per image; NaN for
    a K every caption (or image) would reach whatever the model (see `metrics`)."""
    _require(dataset, "captions", "retrieval")
    _check_images(dataset)
    encoded = encode_dataset(clip, eval_samples(dataset), batch_size=batch_size)
    out = retrieval_recall_at_k(encoded.image_embeds, encoded.text_embeds, encoded.text_to_image, ks)
    out.update(captions=int(encoded.text_embeds.shape[0]), **encoded.report_extras())
    return out


def _relabel(samples: list[Sample], names: list[str], onto: list[str], where: str) -> list[Sample]:
    if names == onto:
        return samples
    unknown = [n for n in names if n not in onto]
    if unknown:
        raise DataError(f"{where}: classes {unknown[:5]} are not in the probe's train classes")
    remap = [onto.index(n) for n in names]
    return [Sample(s.image, s.caption, remap[s.label], s.image_id) for s in samples]


def linear_probe_eval(clip: CLIP, train_dataset: Dataset, test_dataset: Dataset,
                      val_fraction: float = 0.2, *, seed: int = 0, batch_size: int = IMAGE_BATCH) -> dict:
    """Logistic regression on frozen image features: `train_dataset.samples` split by
    `val_fraction` (seeded, per class) to choose the L2 strength, scored on the test dataset's
    evaluation samples (its val/ split if it has one)."""
    _require(train_dataset, "class_folders", "a linear probe")
    _require(test_dataset, "class_folders", "a linear probe")
    check_classes(train_dataset, PROBE)
    test_samples = _relabel(eval_samples(test_dataset), test_dataset.class_names,
                            train_dataset.class_names, str(test_dataset.source))
    check_val_fraction(val_fraction)
    test = encode_dataset(clip, test_samples, batch_size=batch_size, texts=False)
    return _linear_probe(clip, train_dataset, test, val_fraction, seed, batch_size)


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1) to choose the probe's L2 strength, "
                          f"got {val_fraction}")


def _linear_probe(clip: CLIP, train_dataset: Dataset, test: EncodedDataset, val_fraction: float,
                  seed: int, batch_size: int) -> dict:
    fit, val = split_samples(train_dataset.samples, val_fraction, seed)
    if not val:
        raise DataError(f"{train_dataset.source}: too few images per class for a validation split "
                        f"(val_fraction {val_fraction}); a linear probe needs 2+ images in a class")
    fit_enc, val_enc = (encode_dataset(clip, s, batch_size=batch_size, texts=False) for s in (fit, val))
    out = linear_probe(fit_enc.image_embeds, fit_enc.labels, val_enc.image_embeds, val_enc.labels,
                       test.image_embeds, test.labels, seed=seed)
    out.update(images=test.num_images, train_images=fit_enc.num_images, val_images=val_enc.num_images,
               unreadable_images=sum(len(e.unreadable) for e in (fit_enc, val_enc, test)))
    return out


# --- evaluate / compare -----------------------------------------------------------------------


def parse_tasks(tasks: Sequence[str] | str | None) -> list[str] | None:
    if tasks is None:
        return None
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    out = []
    for name in names:
        if name not in TASK_ALIASES:
            known = ", ".join(sorted(set(TASK_ALIASES.values())))
            raise ConfigError(f"unknown task {name!r}; tasks are {known}")
        if TASK_ALIASES[name] not in out:
            out.append(TASK_ALIASES[name])
    if not out:
        raise ConfigError("tasks is empty; leave it out to run every task the data allows")
    return out


def _tasks_for(dataset: Dataset, wanted: list[str] | None) -> list[str]:
    if dataset.kind == "captions":
        possible = [RETRIEVAL]
    else:
        possible = [ZERO_SHOT] + ([PROBE] if dataset.val is not None else [])
    return possible if wanted is None else [t for t in possible if t in wanted]


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, (str, Path)) else list(x)


@dataclass
class _Job:
    path: str | Path
    dataset: Dataset
    role: str  # "target" | "control"
    tasks: list[str]


def load_jobs(data, *, control=None, templates=None, classes=None, tasks=None, image_column=None,
              caption_column=None, split=None) -> list[_Job]:
    """Read every dataset and decide its tasks before any model is loaded: bad input fails fast."""
    wanted = parse_tasks(tasks)
    if templates is not None and not isinstance(templates, (str, Path)):
        templates = check_templates(templates)
    columns = {"image_column": image_column, "caption_column": caption_column, "split": split}
    jobs = [_Job(p, load_dataset(p, templates=templates, classes=classes, **columns), "target", [])
            for p in _as_list(data)]
    # A control domain has its own classes: the target's class list never applies to it.
    jobs += [_Job(p, load_dataset(p, templates=templates), "control", []) for p in _as_list(control)]
    if not jobs:
        raise ConfigError("no data to evaluate: give at least one dataset")
    for job in jobs:
        job.tasks = _tasks_for(job.dataset, wanted)
        for task in job.tasks:
            _check_task(job.dataset, task)
    for task in wanted or []:
        if not any(task in j.tasks for j in jobs):
            need = {ZERO_SHOT: "class folders", RETRIEVAL: "a captions file",
                    PROBE: "class folders with train/ and val/ splits"}[task]
            raise DataError(f"task {task} needs {need}, and none of the datasets is laid out so")
    return jobs


def evaluate_clip(clip: CLIP, jobs: Sequence[_Job], *, model_name: str, batch_size: int = IMAGE_BATCH,
                  val_fraction: float = 0.2, seed: int = 0) -> list[dict]:
    """Run the jobs' tasks with an already-loaded model -> CLIP_benchmark-shaped result dicts."""
    results = []
    for job in jobs:
        ds = job.dataset
        for task in job.tasks:
            _check_task(ds, task)
        encoded = None
        if ZERO_SHOT in job.tasks or PROBE in job.tasks:
            encoded = encode_dataset(clip, eval_samples(ds), batch_size=batch_size, texts=False)
        for task in job.tasks:
            if task == ZERO_SHOT:
                metrics = _zero_shot_metrics(clip, encoded, ds.class_names, ds.templates or DEFAULT_TEMPLATES)
            elif task == RETRIEVAL:
                metrics = retrieval(clip, ds, batch_size=batch_size)
            else:
                metrics = _linear_probe(clip, ds, encoded, val_fraction, seed, batch_size)
            results.append(_result(job, model_name, task, metrics))
    return results


def _result(job: _Job, model_name: str, task: str, metrics: dict) -> dict:
    scores = {k: v for k, v in metrics.items()
              if k in ("acc1", "acc5", "mean_per_class_recall") or "retrieval_recall@" in k}
    extras = {k: v for k, v in metrics.items() if k not in scores}
    return results_json(str(job.path), model_name, task, scores, role=job.role, **extras)


def _out_json(out: str | Path, stem: str) -> Path:
    out = Path(out)
    return out if out.suffix == ".json" else out / f"{stem}.json"


def evaluate(model, data, *, backend: str = "mlx", templates=None, classes=None, out: str | Path | None = None,
             tasks=None, control=None, batch_size: int = IMAGE_BATCH, val_fraction: float = 0.2, seed: int = 0,
             device: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
             image_column: str | None = None, caption_column: str | None = None,
             image_size: int | None = None, split: str | None = None, quantize: int | None = None,
             max_num_patches: int | None = None) -> list[dict]:
    """Evaluate `model` (folder, built-in name or hub id) on `data` (one or more dataset paths)
    and optional `control` domains; write `out` (a .json path, or a folder for eval.json) with its
    Markdown and figures. Returns the result dicts."""
    jobs = load_jobs(data, control=control, templates=templates, classes=classes, tasks=tasks,
                     image_column=image_column, caption_column=caption_column, split=split)
    check_val_fraction(val_fraction)
    clip = load(model, backend, device=device, dtype=dtype, allow_pickle=allow_pickle, image_size=image_size,
                quantize=quantize, max_num_patches=max_num_patches)
    results = evaluate_clip(clip, jobs, model_name=str(model), batch_size=batch_size,
                            val_fraction=val_fraction, seed=seed)
    if out is not None:
        write_report(results, _out_json(out, "eval"))
    return results


@dataclass(frozen=True)
class Comparison:
    base: list[dict]
    finetuned: list[dict]
    files: list[ReportFiles]  # one per (dataset, task) pair
    markdown: Path | None  # every pair's table, and links to its figures, in one file


def compare(base_model, finetuned_model, data, *, out: str | Path, backend: str = "mlx", templates=None,
            classes=None, tasks=None, control=None, batch_size: int = IMAGE_BATCH, val_fraction: float = 0.2,
            seed: int = 0, device: str | None = None, dtype: str | None = None,
            allow_pickle: bool = False, image_column: str | None = None,
            caption_column: str | None = None, image_size: int | None = None,
            split: str | None = None, quantize: int | None = None,
            max_num_patches: int | None = None) -> Comparison:
    """Evaluate both models on the same data (one at a time, so only one is in memory) and write,
    per dataset and task, the metric-by-metric table with fine-tuned − base and its figures;
    `compare.md` gathers the tables and links the figures."""
    from mlx_clip.evaluation.results import compare_table

    jobs = load_jobs(data, control=control, templates=templates, classes=classes, tasks=tasks,
                     image_column=image_column, caption_column=caption_column, split=split)
    check_val_fraction(val_fraction)
    runs = []
    for model in (base_model, finetuned_model):
        clip = load(model, backend, device=device, dtype=dtype, allow_pickle=allow_pickle, image_size=image_size,
                    quantize=quantize, max_num_patches=max_num_patches)
        runs.append(evaluate_clip(clip, jobs, model_name=str(model), batch_size=batch_size,
                                  val_fraction=val_fraction, seed=seed))
        del clip
    out = Path(out)
    folder = out.parent if out.suffix == ".json" else out
    write_report(runs[0], folder / "base.json")
    write_report(runs[1], folder / "finetuned.json")
    markdown = folder / "compare.md"
    files, md = [], ["# Base vs fine-tuned", "",
                     f"base = `{base_model}`, fine-tuned = `{finetuned_model}`", ""]
    for i, (b, f) in enumerate(zip(*runs, strict=True)):
        stem = f"compare-{i}-{b['role']}-{b['task']}"
        files.append(write_comparison(b, f, folder / f"{stem}.json"))
        label = f"{b['role']}: {b['dataset']} · {b['task']}"
        md += [f"## {label}", "", compare_table(b, f), ""]
        # The pair's figures (metrics side by side; per class when both sides have it), linked
        # relative to compare.md so the folder can be moved or served as it is.
        for png in files[-1].figures:
            kind = "per-class accuracy" if png.stem.endswith("-per_class") else "metrics"
            md += [f"![{kind}, {label}]({quote(Path(os.path.relpath(png, markdown.parent)).as_posix())})", ""]
    markdown.write_text("\n".join(md))
    return Comparison(runs[0], runs[1], files, markdown)
