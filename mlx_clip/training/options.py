"""Every fine-tuning default, once. A TOML/YAML file overrides them and command-line flags override
the file (flag > file > preset > default); the resolved config is printed and saved with the run.

Kept apart from `config.py` (the architecture) because it changes with the trainer, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_clip.errors import ConfigError
from mlx_clip.engine.policy import DTYPES

STRATEGIES = ("full", "lora", "lock-image", "lock-text", "lp-ft")
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "bf16", "fp16")
PURE_PRECISIONS = {"bf16": "bfloat16", "fp16": "float16"}
LOSS_NAMES = ("clip", "siglip")


@dataclass
class TrainConfig:
    """Fine-tuning options. Help strings are the metadata; `mlxclip finetune --help` shows them."""

    model: str = field(default="tiny", metadata={"help": "Model folder, built-in name (tiny, small, vit-b32) or hub id."})
    data: str | None = field(default=None, metadata={
        "help": "Captions file (CSV/TSV/JSONL), class-folder root, folder with train/ and val/, webdataset tar "
                "shards ('shards/{00000..00099}.tar', a folder or a list file), parquet (a file or folder) or "
                "hf:org/name. Default: the built-in demo domain."})
    val_data: str | None = field(default=None, metadata={"help": "Held-out data (default: split off --val-fraction)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share held out for validation when no split is given."})
    control_data: str | None = field(default=None, metadata={
        "help": "Class folders of a domain not trained on, evaluated to measure forgetting."})
    templates: str | None = field(default=None, metadata={"help": "Prompt templates file, one per line with {}."})
    image_column: str | None = field(default=None, metadata={
        "help": "Captions file: the column (CSV/TSV) or key (JSONL) of the image paths (default: image or filepath); "
                "shards: the image member's extension; parquet: the image column."})
    caption_column: str | None = field(default=None, metadata={
        "help": "Captions file: the column or key of the captions (default: caption or title); shards: the json "
                "field or member extension; parquet: the column (default: caption, text, ...)."})
    negative_column: str | None = field(default=None, metadata={
        "help": "Hard-negative captions (NegCLIP, Yuksekgonul et al. 2023): the column(s), comma-separated, of "
                "captions that are wrong for their image (CSV/TSV columns; JSONL keys, parquet columns and shards' "
                "json fields may also hold a list). Each joins the text side as an extra negative of its own image "
                "only; an empty cell is no negative."})
    split: str | None = field(default=None, metadata={
        "help": "hf:org/name or a parquet folder: the split to train on (default: train)."})
    out: str = field(default="runs/finetune", metadata={"help": "Run folder (checkpoints, metrics, final/)."})
    backend: str = field(default="mlx", metadata={"help": "Engine: mlx or torch."})
    device: str | None = field(default=None, metadata={"help": "Override device detection (torch: cpu|cuda|mps)."})
    dtype: str = field(default="float32", metadata={"help": "Parameter dtype: float32, bfloat16 or float16."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow a model's pytorch_model.bin (read with weights_only=True; never executes code)."})
    precision: str = field(default="fp32", metadata={
        "help": "Compute precision (open_clip's names): fp32; amp_bf16 / amp_fp16 (autocast, float32 master "
                "weights and optimizer state); bf16 / fp16 (parameters in that dtype, as --dtype)."})
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps (default: from --epochs)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data when --steps is not given."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per step (all are negatives of each other)."})
    image_size: int | None = field(default=None, metadata={
        "help": "Train at this many pixels: the position embeddings are resampled bicubically (transformers' "
                "interpolate_pos_encoding), and final/ is a model of this size. Default: the model's own."})
    resolution_schedule: str | None = field(default=None, metadata={
        "help": "STEP:SIZE pairs, e.g. 0:160,2000:224: the image size from each step on (progressive resizing, "
                "FixRes-style fine-tuning at the end); position embeddings are interpolated on the fly, as "
                "transformers' interpolate_pos_encoding; each size a multiple of the patch size."})
    buckets: bool = field(default=False, metadata={
        "help": "Aspect-ratio buckets for data of mixed shapes: each image is resized to the patch grid nearest "
                "its aspect ratio (no more patches than the square one, ratios up to 2:1) instead of cropped to a "
                "square; a batch holds one shape, position embeddings are interpolated (evaluation stays square)."})
    max_num_patches: int | None = field(default=None, metadata={
        "help": "NaFlex SigLIP 2 (model_type siglip2) only: each image is resized, keeping its aspect ratio, to at "
                "most this many patches, and padded to it (a batch mixes aspect ratios; no buckets needed). "
                "Default: the model folder's preprocessor (256 for google/siglip2-*-naflex)."})
    memory_budget: str | None = field(default=None, metadata={
        "help": "A memory budget such as 8GB: a short probe picks the largest --micro-batch-size that fits "
                "(with a 15% margin) and says what it chose; too small for one pair is an error naming the "
                "smallest budget that works."})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "Feature caching (GradCache): run the towers on this many pairs at a time while the contrastive "
                "loss sees the whole --batch-size; the update equals the full-batch one, the memory is that of a "
                "micro-batch."})
    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warmup steps before cosine decay."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Cosine floor as a share of --lr."})
    weight_decay: float = field(default=0.1, metadata={
        "help": "Decoupled weight decay (not on biases, norms, embeddings, logit_scale)."})
    l2_to_base: float = field(default=0.0, metadata={
        "help": "L2-SP (Li et al. 2018): pull every trained tensor toward its value at the start of the run, "
                "decoupled like the weight decay (w -= lr * l2_to_base * (w - w0)); 0: off."})
    layer_decay: float = field(default=1.0, metadata={
        "help": "Layer-wise lr decay (BEiT, timm's param_groups_layer_decay), e.g. 0.75: in each tower the "
                "embeddings are layer 0, encoder layer i is i+1 and what follows the last layer (final norm, "
                "projection, heads, logit scale) is depth+1; each parameter's lr is --lr x decay ** (depth + 1 - "
                "layer). In (0, 1]; 1: off."})
    ema_decay: float | None = field(default=None, metadata={
        "help": "Keep an exponential moving average of the trained weights (timm's ModelEmaV3), e.g. 0.999: "
                "after each update ema = decay * ema + (1 - decay) * weights, in float32; saved with every "
                "checkpoint, written to OUT/final-ema and evaluated beside final/. In (0, 1); unset: off."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (CLIP's 0.98)."})
    eps: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    grad_clip: float = field(default=1.0, metadata={"help": "Global gradient-norm clip (0 disables)."})
    loss: str | None = field(default=None, metadata={
        "help": "Contrastive loss: clip (InfoNCE) or siglip (sigmoid). Default: the model's own (siglip for "
                "SigLIP models, clip otherwise)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the CLIP loss."})
    hard_negative_beta: float = field(default=0.0, metadata={"help": "Hard-negative reweighting (0: off)."})
    patch_dropout: float = field(default=0.0, metadata={
        "help": "Patch dropout (FLIP, Li et al. 2023; open_clip's --force-patch-dropout): while training, each "
                "image keeps a random (1 - rate) of its patches, drawn from the seed and the step (resumable); "
                "evaluation keeps all. In [0, 1); 0: off."})
    multi_positive: bool = field(default=True, metadata={
        "help": "Pairs of one class, of one image, or of different images with the same caption (compared "
                "case- and punctuation-blind) are positives, not negatives; the start record counts the captions "
                "shared between images."})
    strategy: str = field(default="full", metadata={
        "help": "full, lora, lock-image, lock-text, or lp-ft (Kumar et al. 2022: --lp-steps steps that train only "
                "the projections and logit scale, then the full model with a fresh optimizer and schedule)."})
    lp_steps: int = field(default=100, metadata={"help": "lp-ft: steps of the first, projections-only phase."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha/rank)."})
    lora_targets: str = field(default="q_proj,k_proj,v_proj,out_proj,fc1,fc2", metadata={
        "help": "Comma-separated LoRA target layers."})
    augment: bool = field(default=True, metadata={"help": "Seeded random resized crop (no flip)."})
    crop_scale_min: float = field(default=0.9, metadata={"help": "Smallest crop area share of the augmentation."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    compile: bool = field(default=False, metadata={
        "help": "torch engine: run the towers' forward and backward through torch.compile (Inductor); the first "
                "steps at each image size pay the compilation. Same results as eager within float32 rounding."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, augmentation and new parameters."})
    num_workers: int = field(default=2, metadata={"help": "Image decoding threads."})
    max_bad_fraction: float = field(default=0.05, metadata={"help": "Stop if more images than this share are bad."})
    log_every: int = field(default=10, metadata={"help": "Steps between metric lines."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept (older ones are deleted)."})
    evaluate: bool = field(default=True, metadata={
        "help": "Zero-shot top-1 / retrieval R@1 on held-out data before and after training."})
    eval_every: int = field(default=0, metadata={"help": "Steps between zero-shot evaluations (0: before/after only)."})
    max_control_drop: float | None = field(default=None, metadata={
        "help": "Stop early when control zero-shot top-1 falls more than this below its start (needs "
                "--control-data and --eval-every)."})
    max_nan_steps: int = field(default=5, metadata={"help": "Consecutive non-finite steps that stop the run."})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from."})
    tensorboard: bool = field(default=False, metadata={
        "help": "Also write TensorBoard event files to OUT/tensorboard (loss, lr, logit scale, gradient norm, "
                "images/s, memory, evaluations)."})
    keep_best: str | None = field(default=None, metadata={
        "help": "Keep the model with the best value of this evaluation metric in OUT/best (acc1 = held-out "
                "zero-shot top-1, R@1 = image retrieval, or a metric name from metrics.jsonl)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a run already in --out (its metrics, checkpoints and final/); without it such a folder "
                "is refused unless --resume."})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_types(cls) -> dict[str, tuple[type, bool]]:
        """name -> (value type, whether None is allowed), from the real annotations (the module
        uses postponed annotations, so `Field.type` is only a string)."""
        out = {}
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint)
            optional = type(None) in args
            out[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
        return out

    @classmethod
    def check_types(cls, values: dict[str, Any], source: str) -> None:
        """Refuse a value of the wrong type from a file or preset before it can be misused:
        `steps = true`, `val_fraction = "0.1"`, `lora_targets = ["q_proj"]`."""
        types = cls.field_types()
        for name, value in values.items():
            kind, optional = types[name]
            if value is None and optional:
                continue
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind)
            if not ok:
                expected = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[kind]
                raise ConfigError(f"{source}: {name} must be {expected}{' or null' if optional else ''}, "
                                  f"got {value!r} ({type(value).__name__})")

    @classmethod
    def resolve(cls, file: str | Path | None = None, flags: dict[str, Any] | None = None,
                preset: dict[str, Any] | None = None) -> "TrainConfig":
        """flag > file > preset > default. `flags` holds only options the user actually gave."""
        values: dict[str, Any] = {}
        for source, layer in (("preset", preset or {}), (str(file), read_config_file(file) if file else {}),
                              ("flags", flags or {})):
            unknown = sorted(set(layer) - set(cls.field_names()))
            if unknown:
                raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; "
                                  f"valid options: {', '.join(cls.field_names())}")
            cls.check_types(layer, source)
            values.update(layer)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name} {rule}, got {getattr(self, name)!r}")

        if isinstance(self.batch_size, int) and self.batch_size == 1:
            raise ConfigError("batch_size must be at least 2, got 1: a contrastive loss scores each pair against the "
                              "other pairs of its batch; alone, its loss and gradient are 0 and nothing is learned")
        for name in ("batch_size", "log_every", "max_nan_steps", "lora_rank", "keep_checkpoints", "lp_steps"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                  "must be a positive integer")
        for name in ("warmup_steps", "save_every", "eval_every", "num_workers", "seed"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                  "must be a non-negative integer")
        if self.steps is not None:
            check(isinstance(self.steps, int) and self.steps >= 1, "steps", "must be a positive integer")
        if self.max_num_patches is not None:
            check(isinstance(self.max_num_patches, int) and not isinstance(self.max_num_patches, bool)
                  and self.max_num_patches >= 1, "max_num_patches", "(--max-num-patches) must be a positive integer")
        if self.micro_batch_size is not None:
            check(isinstance(self.micro_batch_size, int) and 1 <= self.micro_batch_size <= self.batch_size,
                  "micro_batch_size", f"must be an integer from 1 to --batch-size ({self.batch_size})")
        for name in ("lr", "epochs", "lora_alpha", "eps"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name,
                  "must be a positive number")
        for name in ("weight_decay", "grad_clip", "label_smoothing", "hard_negative_beta", "l2_to_base"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name,
                  "must be a non-negative number")
        for name in ("val_fraction", "min_lr_ratio", "max_bad_fraction"):
            check(0 <= getattr(self, name) < 1 or (name == "max_bad_fraction" and getattr(self, name) == 1),
                  name, "must be in [0, 1)")
        for name in ("beta1", "beta2"):
            check(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (number(self.layer_decay) and 0 < self.layer_decay <= 1):
            raise ConfigError(f"layer_decay (--layer-decay) must be in (0, 1], e.g. 0.75 (1: every layer at --lr), "
                              f"got {self.layer_decay!r}")
        if self.compile and self.backend != "torch":
            raise ConfigError(f"compile (--compile) is for the torch engine; the {self.backend} engine always compiles "
                              "its step (mx.compile). Drop --compile or use --backend torch")
        if not (number(self.patch_dropout) and 0 <= self.patch_dropout < 1):
            raise ConfigError(f"patch_dropout (--patch-dropout) must be in [0, 1), e.g. 0.5 (0: every patch), "
                              f"got {self.patch_dropout!r}")
        if self.ema_decay is not None and not (number(self.ema_decay) and 0 < self.ema_decay < 1):
            raise ConfigError(f"ema_decay (--ema-decay) must be in (0, 1), e.g. 0.999, got {self.ema_decay!r}")
        if self.max_control_drop is not None:
            check(0 <= self.max_control_drop <= 1, "max_control_drop", "must be in [0, 1]")
        check(0 < self.crop_scale_min <= 1, "crop_scale_min", "must be in (0, 1]")
        if self.keep_best is not None and not self.evaluate:
            raise ConfigError(f"keep_best {self.keep_best!r} needs evaluations; drop --no-evaluate")
        check(self.label_smoothing < 1, "label_smoothing", "must be below 1")
        check(self.backend in ("mlx", "torch"), "backend", "must be mlx or torch")
        check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        check(self.loss is None or self.loss in LOSS_NAMES, "loss", f"must be one of {', '.join(LOSS_NAMES)}")
        check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        check(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.precision in PURE_PRECISIONS and self.dtype not in ("float32", PURE_PRECISIONS[self.precision]):
            raise ConfigError(f"precision {self.precision} keeps the parameters in {PURE_PRECISIONS[self.precision]}, "
                              f"but dtype is {self.dtype}; give one of the two")
        if self.precision.startswith("amp_") and self.dtype != "float32":
            raise ConfigError(f"precision {self.precision} keeps float32 master weights; dtype must be float32, "
                              f"got {self.dtype}")

    @property
    def parameter_dtype(self) -> str:
        """The dtype the parameters live in: bf16 / fp16 precision imply it, else `dtype`."""
        return PURE_PRECISIONS.get(self.precision, self.dtype)

    @property
    def autocast_dtype(self) -> str | None:
        """The low-precision compute dtype of mixed precision (amp_*), else None."""
        return {"amp_bf16": "bfloat16", "amp_fp16": "float16"}.get(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def describe(self) -> str:
        return "\n".join(f"  {k:22s} {v}" for k, v in self.to_dict().items())


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config file must be .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as err:  # tomllib/yaml/json each raise their own type
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}
