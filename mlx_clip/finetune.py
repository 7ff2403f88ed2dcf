"""`mlxclip finetune`: resolve the model and data, build the engine and the loader, run the trainer,
and report zero-shot top-1 / retrieval R@1 on held-out data before and after."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_clip.api import CLIP, preprocessor_settings, resolve
from mlx_clip.backend import Backend, load_backend
from mlx_clip.checkpoint import FollowerRun, RunFolder
from mlx_clip.data.loader import BatchLoader
from mlx_clip.data.records import Dataset, load_dataset, split_samples
from mlx_clip.distributed import World, launched
from mlx_clip.errors import DataError
from mlx_clip.tokenizer import load_tokenizer
from mlx_clip.train_config import TrainConfig
from mlx_clip.trainer import Trainer, TrainResult


# The sigmoid loss learns the demo domain more slowly than InfoNCE: siglip-tiny reached held-out
# top-1 0.79 after 1000 steps at lr 1e-3 (0.58 at the CLIP demo's 2e-3, 0.65 at 5e-4), so its demo
# runs 2000 steps. Its first ~350 steps sit on a plateau at the CLIP demo's 40 warm-up steps;
# warming up over a tenth of the run gave 0.9375 (0.95 from a second random init) against 0.892
# (0.925) at 40 and 0.904 at 400 (2000 steps, measured side by side on 2 cores: ~4 minutes).
DEMO_BY_MODEL: dict[str, dict[str, Any]] = {"siglip-tiny": {"lr": 1e-3, "steps": 2000, "warmup_steps": 200}}


def demo_preset(model: str | None = None) -> dict[str, Any]:
    """The built-in default: the 'small' random model on the rendered shapes domain (or the
    built-in `model`, with its own learning rate and length). Values sit between the defaults
    and the user's file/flags, so any of them can still be overridden."""
    # The demo's folder is the toolkit's own scratch: running the demo again replaces it.
    preset = {"model": "small", "lr": 2e-3, "steps": 1000, "batch_size": 48, "warmup_steps": 40,
              "weight_decay": 0.05, "out": "runs/demo", "log_every": 20, "save_every": 250, "overwrite": True}
    return {**preset, **DEMO_BY_MODEL.get(model or preset["model"], {})}


@dataclass
class DomainData:
    train: list
    val: list
    class_names: list[str] | None
    templates: list[str] | None
    val_captions: Dataset | None  # captions for retrieval on held-out images
    control: Dataset | None


def prepare_data(cfg: TrainConfig) -> DomainData:
    if cfg.data is None:
        from mlx_clip.builtin import cache_root
        from mlx_clip.data.demo import make_demo

        paths = make_demo(cache_root() / "demo")
        target = load_dataset(paths["target"], templates=cfg.templates)
        captions = load_dataset(paths["captions_val"])
        control = load_dataset(paths["control_val"], templates=cfg.templates)
        return DomainData(target.samples, target.val or [], target.class_names, target.templates, captions, control)
    columns = {"image_column": cfg.image_column, "caption_column": cfg.caption_column}
    data = load_dataset(cfg.data, templates=cfg.templates, **columns)
    if cfg.val_data:
        val_set = load_dataset(cfg.val_data, templates=cfg.templates, classes=data.class_names, **columns)
        train, val = data.samples, val_set.samples
    elif data.val is not None:
        train, val = data.samples, data.val
    elif cfg.val_fraction > 0:
        train, val = split_samples(data.samples, cfg.val_fraction, cfg.seed)
    else:
        train, val = data.samples, []
    if not train:
        raise DataError(f"{cfg.data}: no training samples left after the validation split")
    control = load_dataset(cfg.control_data, templates=cfg.templates) if cfg.control_data else None
    val_captions = None
    if data.kind == "captions" and val:
        val_captions = Dataset(val, None, None, "captions", data.source)
    return DomainData(train, val, data.class_names, data.templates, val_captions, control)


def make_evaluator(data: DomainData, folder: Path, batch_size: int):
    from mlx_clip.evaluate import retrieval, zero_shot

    def evaluate(engine) -> dict[str, float]:
        clip = CLIP(engine, folder)
        out: dict[str, float] = {}
        if data.class_names and data.val:
            held_out = Dataset(data.val, data.class_names, data.templates, "class_folders", Path("val"))
            out["val_zero_shot_top1"] = float(zero_shot(clip, held_out, data.templates, batch_size=batch_size)["acc1"])
        if data.val_captions is not None:
            metrics = retrieval(clip, data.val_captions, batch_size=batch_size)
            out["val_image_retrieval_R@1"] = float(metrics["image_retrieval_recall@1"])
            out["val_text_retrieval_R@1"] = float(metrics["text_retrieval_recall@1"])
        if data.control is not None:
            out["control_zero_shot_top1"] = float(
                zero_shot(clip, data.control, data.control.templates, batch_size=batch_size)["acc1"])
        return out

    return evaluate


def build_engine(cfg: TrainConfig, folder: Path) -> Backend:
    engine = load_backend(cfg.backend, folder, device=cfg.device, dtype=cfg.parameter_dtype,
                          allow_pickle=cfg.allow_pickle, image_size=cfg.image_size)
    engine.prepare_training(cfg)
    return engine


@dataclass
class FinetuneResult:
    train: TrainResult
    before: dict[str, float] | None
    after: dict[str, float] | None
    run: RunFolder


def finetune(cfg: TrainConfig, *, echo=print, progress: bool | str = True, evaluate: bool | None = None,
             stop_after: int | None = None) -> FinetuneResult:
    launch = launched(cfg.backend)  # under torchrun / mlx.launch: rank 0 alone writes and speaks
    main = launch is None or launch.rank == 0
    if not main:
        echo, progress = (lambda *args, **kwargs: None), False
    echo("mlxclip finetune, resolved config:\n" + cfg.describe())
    data = prepare_data(cfg)  # every input problem surfaces here, before any model is resolved or built
    run = RunFolder(cfg.out) if main else FollowerRun(cfg.out)
    if not cfg.resume:
        run.claim(overwrite=cfg.overwrite)
    folder = resolve(cfg.model, allow_pickle=cfg.allow_pickle)
    if cfg.memory_budget:
        cfg = _within_budget(cfg, folder, run, echo)
    tokenizer = load_tokenizer(folder)
    engine = build_engine(cfg, folder)
    world = getattr(engine, "world", None) or World()  # the engine checked the batch divides over it
    mean, std, crop = preprocessor_settings(folder)
    loader = BatchLoader(data.train, batch_size=cfg.batch_size, image_size=engine.config.vision_config.image_size,
                         tokenize=lambda texts: tokenizer.trim(tokenizer.encode(texts)), seed=cfg.seed, augment=cfg.augment,
                         num_workers=cfg.num_workers, max_bad_fraction=cfg.max_bad_fraction,
                         crop_scale=(cfg.crop_scale_min, 1.0), mean=mean, std=std, crop=crop,
                         multi_positive=cfg.multi_positive, buckets=cfg.buckets,
                         patch_size=engine.config.vision_config.patch_size)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(loader)))
    run.prepare()
    if main:
        cfg.save(run.root / "config.json")
    evaluate = cfg.evaluate if evaluate is None else evaluate
    evaluator = make_evaluator(data, folder, cfg.batch_size) if evaluate else None
    trainer = Trainer(cfg, engine, loader, run, total, evaluate=evaluator, progress=progress, stop_after=stop_after)
    echo(f"{engine.name} engine, {engine.trainable_count():,} trainable parameters, {len(data.train)} training "
         f"samples, {len(data.val)} held out, {total} steps of {cfg.batch_size}"
         + (f" ({cfg.batch_size // world.size} on each of {world.size} processes)" if world.size > 1 else ""))
    if cfg.buckets:
        shown = ", ".join(f"{h}x{w}: {n}" for (h, w), n in loader.bucket_counts() if n)
        echo(f"aspect-ratio buckets (height x width: samples): {shown}; each epoch leaves out fewer than "
             f"{cfg.batch_size} samples of each bucket, a different few every epoch")
    before = None
    if not cfg.resume:
        trainer.log.write({"step": 0, "event": "start", "engine": engine.name, "train_samples": len(data.train),
                           "val_samples": len(data.val), "trainable_parameters": engine.trainable_count(),
                           "total_steps": total})
    if cfg.resume:
        checkpoint = run.resolve_resume(cfg.resume)
        trainer.restore(checkpoint)
        echo(f"resumed from {checkpoint} at step {trainer.step}")
    elif evaluator:
        before = evaluator(engine)
        trainer.log.write({"step": 0, "eval": before})
    trainer.baseline = before or first_evaluation(run)
    try:
        result = trainer.fit()
    finally:
        if main:
            write_bad_images(run, loader)
    after = evaluator(engine) if evaluator else None
    if after:
        trainer.log.write({"step": trainer.step, "eval": after})
        trainer.consider_best(after, echo)
        trainer.log.close()
        echo(summary_table(before, after))
    echo(f"final model: {result.final_model}")
    return FinetuneResult(result, before, after, run)


def _within_budget(cfg: TrainConfig, folder: Path, run: RunFolder, echo) -> TrainConfig:
    """--memory-budget: the probe's micro-batch; a resumed run keeps the one it started with, as
    another would change the float32 summation order and resume is exact."""
    import dataclasses

    from mlx_clip.checkpoint import read_trainer_state
    from mlx_clip.memory_budget import budgeted

    if cfg.resume:
        started = read_trainer_state(run.resolve_resume(cfg.resume)).get("config", {})
        return dataclasses.replace(cfg, micro_batch_size=started.get("micro_batch_size"))
    return budgeted(cfg, folder, echo)  # before any engine is built here: the probe runs apart


def first_evaluation(run: RunFolder) -> dict | None:
    """The before-training metrics of a resumed run, from its log."""
    from mlx_clip.monitor import MetricsLog

    for record in MetricsLog(run.metrics_path).read():
        if record.get("step") == 0 and "eval" in record:
            return record["eval"]
    return None


def write_bad_images(run: RunFolder, loader: BatchLoader) -> None:
    bad = loader.bad_files
    if bad:
        lines = [f"{path}\t{reason}" for path, reason in bad]
        (run.root / "bad_images.txt").write_text("\n".join(lines) + "\n")
        print(f"skipped {len(bad)} unreadable image(s); listed in {run.root / 'bad_images.txt'}")


def summary_table(before: dict | None, after: dict) -> str:
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key, value in after.items():
        prior = f"{before[key]:.4f}" if before and key in before else "—"
        rows.append(f"| {key} | {prior} | {value:.4f} |")
    return "\n".join(rows)
