"""`mlxclip finetune`: resolve the model and data, build the engine and the loader, run the trainer,
and report zero-shot top-1 / retrieval R@1 on held-out data before and after."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_clip.api import CLIP, image_processor, preprocessor_settings, resolve
from mlx_clip.engine.protocol import Backend, load_backend
from mlx_clip.training.run_folder import FollowerRun, RunFolder
from mlx_clip.data.fingerprint import fingerprint
from mlx_clip.data.loader import BatchLoader
from mlx_clip.data.records import Dataset, load_dataset, split_samples
from mlx_clip.engine.distributed import launched
from mlx_clip.engine.policy import check_family_options, format_layer_decay_table
from mlx_clip.errors import ConfigError, DataError
from mlx_clip.outputs import check_folder, overlap, refuse_overlap
from mlx_clip.model.config import CLIPConfig
from mlx_clip.model.tokenizer import load_tokenizer
from mlx_clip.training.held_out import CONTROL_TOP1, VAL_IMAGE_R1, VAL_TEXT_R1, VAL_TOP1
from mlx_clip.training.options import TrainConfig
from mlx_clip.training.trainer import Interrupted, Trainer, TrainResult


# The sigmoid loss learns the demo domain more slowly than InfoNCE, so siglip-tiny's demo runs
# twice as long at a lower lr, and warms up over a tenth of it: with the CLIP demo's 40 steps it
# sat on a plateau for its first ~350 (held-out top-1 0.89 at the end, 0.94 with 200).
DEMO_BY_MODEL: dict[str, dict[str, Any]] = {"siglip-tiny": {"lr": 1e-3, "steps": 2000, "warmup_steps": 200},
                                            "siglip2-naflex-tiny": {"lr": 1e-3, "steps": 2000, "warmup_steps": 200}}
# The demo's own folder: the toolkit's scratch, where a rerun of the demo replaces an earlier demo
# run without --overwrite. Any other --out is the user's and never replaced without it.
DEMO_OUT = "runs/demo"
# Below this many held-out samples one sample moves a held-out score by more than 0.05: the
# before/after figures are printed with a warning that they mean little.
MIN_HELD_OUT = 20


def demo_preset(model: str | None = None) -> dict[str, Any]:
    """The built-in default: the 'small' random model on the rendered shapes domain (or the
    built-in `model`, with its own learning rate and length). Values sit between the defaults
    and the user's file/flags, so any of them can still be overridden."""
    preset = {"model": "small", "lr": 2e-3, "steps": 1000, "batch_size": 48, "warmup_steps": 40,
              "weight_decay": 0.05, "out": DEMO_OUT, "log_every": 20, "save_every": 250}
    return {**preset, **DEMO_BY_MODEL.get(model or preset["model"], {})}


@dataclass
class DomainData:
    train: list
    val: list
    class_names: list[str] | None
    templates: list[str] | None
    val_captions: Dataset | None  # captions for retrieval on held-out images
    control: Dataset | None
    root: Path  # where the training data live; image paths are fingerprinted relative to it

    def fingerprint(self) -> dict:
        return fingerprint(self.train, self.val, self.root)


def prepare_data(cfg: TrainConfig) -> DomainData:
    if cfg.data is None and cfg.negative_column:
        raise ConfigError("--negative-column needs --data: the built-in demo's class folders have no hard-negative "
                          "captions")
    if cfg.data is None:
        from mlx_clip.model.builtin import cache_root
        from mlx_clip.data.demo import make_demo

        paths = make_demo(cache_root() / "demo")
        target = load_dataset(paths["target"], templates=cfg.templates)
        captions = load_dataset(paths["captions_val"])
        control = load_dataset(paths["control_val"], templates=cfg.templates)
        return DomainData(target.samples, target.val or [], target.class_names, target.templates, captions, control,
                          paths["target"])
    columns = {"image_column": cfg.image_column, "caption_column": cfg.caption_column}
    data = load_dataset(cfg.data, templates=cfg.templates, split=cfg.split, negative_column=cfg.negative_column,
                        **columns)
    if data.class_names is not None and len(data.class_names) < 2:
        raise DataError(f"{cfg.data}: class folders need two classes or more to fine-tune on, found "
                        f"{len(data.class_names)} ({', '.join(data.class_names)}): every pair of a batch would be a "
                        "positive of every other, and the contrastive loss would have nothing to contrast")
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
    return DomainData(train, val, data.class_names, data.templates, val_captions, control, Path(cfg.data))


def held_out_note(data: DomainData, cfg: TrainConfig) -> str | None:
    """A warning when the held-out scores printed before and after cannot mean much."""
    n = len(data.val)
    if not cfg.evaluate:
        return None
    if n == 0 and cfg.val_fraction > 0 and hasattr(data.train, "shards"):
        return ("note: no held-out samples: streamed data is held out in whole shards and this data has one; give "
                "--val-data for held-out scores before and after")
    if n == 0:
        return ("note: no held-out samples (--val-fraction 0 and no --val-data): no held-out scores are measured "
                "before and after")
    if n < MIN_HELD_OUT:
        images = len({s.image_id for s in data.val})
        skipped = "; retrieval, which needs 2 images, is not measured" if data.class_names is None and images < 2 else ""
        return (f"warning: the held-out split has only {n} sample{'s' if n > 1 else ''}: one sample moves its scores "
                f"by {1 / n:.2f}{skipped}; hold out more (--val-fraction, --val-data) for scores that mean something")
    return None


def holds_demo_run(run: RunFolder) -> bool:
    """A run of the built-in demo: its saved config has no --data."""
    try:
        return json.loads((run.root / "config.json").read_text()).get("data", "") is None
    except (OSError, ValueError, AttributeError):
        return False


def claim_out(cfg: TrainConfig, run: RunFolder) -> list[str]:
    """Check --out before anything is built, and return the run files a new run will replace.
    Refused: a folder that cannot be written; one that is, or lies inside, an input (the run
    would write into the user's data or model); run files that are or hold an input (replacing
    them would delete it); a run that trained, unless --overwrite, or it is the demo's own folder
    holding a demo run."""
    inputs = {"--model": cfg.model, "--data": cfg.data, "--val-data": cfg.val_data,
              "--control-data": cfg.control_data, "--templates": cfg.templates}
    out = Path(cfg.out)
    refuse_overlap(out, inputs, relations=("is", "is inside"))  # the run would write into the input
    for file in RunFolder.RUN_FILES:  # a new run replaces these: none may be or hold an input
        refuse_overlap(out / file, inputs, option=f"--out {out}: its")
    check_folder(out)
    if cfg.resume:
        return []
    demo = cfg.data is None and overlap(out, DEMO_OUT) == "is" and holds_demo_run(run)
    return run.check_claim(overwrite=cfg.overwrite, replaceable=demo)


def make_evaluator(data: DomainData, folder: Path, batch_size: int, max_num_patches: int | None = None):
    from mlx_clip.evaluation.evaluate import retrieval, zero_shot

    def evaluate(engine) -> dict[str, float]:
        clip = CLIP(engine, folder, max_num_patches)
        out: dict[str, float] = {}
        if data.class_names and data.val:
            held_out = Dataset(data.val, data.class_names, data.templates, "class_folders", Path("val"))
            out[VAL_TOP1] = float(zero_shot(clip, held_out, data.templates, batch_size=batch_size)["acc1"])
        if data.val_captions is not None and len({s.image_id for s in data.val_captions.samples}) >= 2:
            metrics = retrieval(clip, data.val_captions, batch_size=batch_size)
            out[VAL_IMAGE_R1] = float(metrics["image_retrieval_recall@1"])
            out[VAL_TEXT_R1] = float(metrics["text_retrieval_recall@1"])
        if data.control is not None:
            out[CONTROL_TOP1] = float(
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
    after_ema: dict[str, float] | None = None  # --ema-decay: the same evaluation of final-ema/


def finetune(cfg: TrainConfig, *, echo=print, progress: bool | str = True, evaluate: bool | None = None,
             stop_after: int | None = None, show_config: bool = True) -> FinetuneResult:
    launch = launched(cfg.backend)  # under torchrun / mlx.launch: rank 0 alone writes and speaks
    main = launch is None or launch.rank == 0
    if not main:
        echo, progress = (lambda *args, **kwargs: None), False
    if show_config:
        echo("mlxclip finetune, resolved config:\n" + cfg.describe())
    data = prepare_data(cfg)  # every input problem surfaces here, before any model is resolved or built
    run = RunFolder(cfg.out) if main else FollowerRun(cfg.out)
    replaced = claim_out(cfg, run) if main else []
    if cfg.resume:
        run.resolve_resume(cfg.resume)  # a missing checkpoint is refused before anything is built
    note = held_out_note(data, cfg)
    if note:
        echo(note)
    try:
        trainer, loader, evaluator = _build(cfg, data, run, progress, evaluate, stop_after, echo)
    except KeyboardInterrupt:
        raise Interrupted("interrupted while starting, before step 0: nothing was trained or written; run the same "
                          "command again") from None
    cfg, engine, world = trainer.cfg, trainer.engine, trainer.world  # cfg: with --memory-budget's choice
    # The run can start: only now does its folder change (a run refused above left nothing behind).
    if replaced:
        echo(f"replacing the run in {run.root} ({', '.join(replaced)})" if run.ever_stepped() else
             f"replacing a run in {run.root} that never reached its first step")
    run.clear(replaced)
    run.prepare()
    if main:
        cfg.save(run.root / "config.json")
    total = trainer.total_steps
    if trainer.warmup_steps != cfg.warmup_steps and not cfg.resume:
        echo(f"note: warmup_steps {cfg.warmup_steps} is not below the run's {total} steps"
             f"{' (or an LP-FT phase)' if cfg.strategy == 'lp-ft' else ''}, so the learning rate would never reach "
             f"--lr: warming up over {trainer.warmup_steps} steps instead, a tenth of it")
    echo(f"{engine.name} engine, {engine.trainable_count():,} trainable parameters, {len(data.train)} training "
         f"samples, {len(data.val)} held out, {total} steps of {cfg.batch_size}"
         + (f" ({cfg.batch_size // world.size} on each of {world.size} processes)" if world.size > 1 else ""))
    negatives = _negative_counts(data.train)
    if negatives:
        echo(f"hard-negative captions (--negative-column {cfg.negative_column}): {negatives['negative_captions']:,} "
             f"for {negatives['rows_with_negatives']:,} of {len(data.train):,} training pairs; each step's text tower "
             f"also runs on {negatives['negative_slots']} slot(s) per pair")
    elif getattr(data.train, "reads_negatives", False):
        echo(f"hard-negative captions (--negative-column {cfg.negative_column}): read with each shard, not counted "
             "ahead; a batch has as many slots per pair as its pair with the most")
    layer_decay = None
    if cfg.layer_decay != 1:
        layer_decay = {"decay": cfg.layer_decay, "groups": engine.layer_decay_table()}
        echo(format_layer_decay_table(layer_decay["groups"], cfg.layer_decay))
    if cfg.buckets:
        shown = ", ".join(f"{h}x{w}: {n}" for (h, w), n in loader.bucket_counts() if n)
        echo(f"aspect-ratio buckets (height x width: samples): {shown}; each epoch leaves out fewer than "
             f"{cfg.batch_size} samples of each bucket, a different few every epoch")
    before = None
    try:
        if cfg.resume:
            checkpoint = run.resolve_resume(cfg.resume)
            trainer.restore(checkpoint)
            echo(f"resumed from {checkpoint} at step {trainer.step}")
        else:
            facts = {"engine": engine.name, "train_samples": len(data.train), "val_samples": len(data.val),
                     "trainable_parameters": engine.trainable_count(), "total_steps": total,
                     **_shared_captions(data.train, cfg.multi_positive), **negatives}
            trainer.log_start({**facts, "layer_decay": layer_decay} if layer_decay else facts)
            before = trainer.evaluate_before()
    except KeyboardInterrupt:
        where = "the checkpoint is unchanged; continue with --resume latest" if cfg.resume else \
            "the run folder holds no training yet: run the same command again"
        raise Interrupted(f"interrupted before the first step; {where}") from None
    try:
        result = trainer.fit()
    finally:
        if main:
            write_bad_images(run, loader)
    try:
        after = evaluator(engine) if evaluator else None
        after_ema = trainer.evaluate_ema() if after else None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted during the final evaluation; training is complete: {result.final_model}") \
            from None
    if after:
        trainer.finish(after, echo, after_ema)
        echo(summary_table(before, after, after_ema))
    echo(f"final model: {result.final_model}")
    if result.final_ema is not None:
        echo(f"final model, weights' moving average (--ema-decay {cfg.ema_decay}): {result.final_ema}")
    return FinetuneResult(result, before, after, run, after_ema)


def _build(cfg: TrainConfig, data: DomainData, run: RunFolder, progress, evaluate: bool | None,
           stop_after: int | None, echo) -> tuple[Trainer, BatchLoader, Any]:
    """Model, engine, loader and trainer: everything that can still refuse the run, before its
    folder is touched."""
    folder = resolve(cfg.model, allow_pickle=cfg.allow_pickle)
    if (folder / "config.json").is_file():  # the family's refusals before any weight is read or probe run
        check_family_options(cfg, CLIPConfig.from_file(folder / "config.json"))
    if cfg.memory_budget:
        cfg = _within_budget(cfg, folder, run, echo, data)
    tokenizer = load_tokenizer(folder)
    engine = build_engine(cfg, folder)
    mean, std, crop = preprocessor_settings(folder)
    naflex = image_processor(folder, engine.config, cfg.max_num_patches) if engine.config.is_naflex else None
    loader = BatchLoader(data.train, batch_size=cfg.batch_size, image_size=engine.config.vision_config.image_size,
                         tokenize=lambda texts: tokenizer.trim(tokenizer.encode(texts)), seed=cfg.seed, augment=cfg.augment,
                         num_workers=cfg.num_workers, max_bad_fraction=cfg.max_bad_fraction,
                         crop_scale=(cfg.crop_scale_min, 1.0), mean=mean, std=std, crop=crop,
                         multi_positive=cfg.multi_positive, buckets=cfg.buckets,
                         patch_size=engine.config.vision_config.patch_size,
                         share=(engine.world.rank, engine.world.size), agree=engine.rank_sum, naflex=naflex)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(loader)))
    evaluate = cfg.evaluate if evaluate is None else evaluate
    evaluator = make_evaluator(data, folder, cfg.batch_size, cfg.max_num_patches) if evaluate else None
    trainer = Trainer(cfg, engine, loader, run, total, evaluate=evaluator, progress=progress, stop_after=stop_after,
                      data_fingerprint=data.fingerprint())
    return trainer, loader, evaluator


def _within_budget(cfg: TrainConfig, folder: Path, run: RunFolder, echo, data: DomainData) -> TrainConfig:
    """--memory-budget: the probe's micro-batch; a resumed run keeps the one it started with, as
    another would change the float32 summation order and resume is exact."""
    import dataclasses

    from mlx_clip.training.run_folder import read_trainer_state
    from mlx_clip.training.memory_budget import budgeted

    if cfg.resume:
        started = read_trainer_state(run.resolve_resume(cfg.resume)).get("config", {})
        return dataclasses.replace(cfg, micro_batch_size=started.get("micro_batch_size"))
    if getattr(data.train, "reads_negatives", False):
        raise ConfigError("--memory-budget cannot size a run whose hard-negative captions are counted batch by batch "
                          "(parquet, shards): give --micro-batch-size instead")
    slots = getattr(data.train, "max_negatives", 0)
    return budgeted(cfg, folder, echo, slots)  # before any engine is built here: the probe runs apart


def write_bad_images(run: RunFolder, loader: BatchLoader) -> None:
    bad = loader.bad_files
    if bad:
        lines = [f"{path}\t{reason}" for path, reason in bad]
        (run.root / "bad_images.txt").write_text("\n".join(lines) + "\n")
        print(f"skipped {len(bad)} unreadable image(s); listed in {run.root / 'bad_images.txt'}")


def summary_table(before: dict | None, after: dict, after_ema: dict | None = None) -> str:
    ema = after_ema is not None
    rows = ["| metric | before | after |" + (" after (EMA) |" if ema else ""), "|---|---|---|" + ("---|" if ema else "")]
    for key, value in after.items():
        prior = f"{before[key]:.4f}" if before and key in before else "—"
        averaged = (f" {after_ema[key]:.4f} |" if key in after_ema else " — |") if ema else ""
        rows.append(f"| {key} | {prior} | {value:.4f} |{averaged}")
    return "\n".join(rows)


def _negative_counts(samples) -> dict:
    """The start record's count of hard-negative captions (--negative-column) and of the rows that have one."""
    if getattr(samples, "negatives", None) is None:
        return {}
    counts = samples.negative_counts()
    return {"negative_captions": int(counts.sum()), "rows_with_negatives": int((counts > 0).sum()),
            "negative_slots": samples.max_negatives}


def _shared_captions(samples, multi_positive: bool) -> dict:
    """The start record's count of training pairs whose caption another image shares (false
    negatives without multi-positive targets): for captions data held as a table; class folders
    already pair by class, and a stream is not read ahead to count."""
    from mlx_clip.data.duplicates import shared_caption_count
    from mlx_clip.data.table import SampleTable

    if not isinstance(samples, SampleTable) or samples.labels is not None:
        return {}
    return {"shared_captions": shared_caption_count(samples.captions, samples.image_ids),
            "shared_captions_are": "positives" if multi_positive else "negatives (--no-multi-positive)"}
