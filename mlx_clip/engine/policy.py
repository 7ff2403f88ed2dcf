"""Decisions both engines execute, made once and without a framework: which dtype names exist,
which device an engine runs on, and what a training run trains.

Each engine turns these answers into its framework's objects (`mx.bfloat16`, `torch.device`,
`freeze()` / `requires_grad_`), so the two engines cannot drift apart on policy.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from mlx_clip.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def decays(name: str, ndim: int) -> bool:
    """Weight decay applies to matrices only: not to biases, norms, embeddings, class token or
    logit_scale / logit_bias (open_clip's exclusion rule, plus embeddings)."""
    if ndim < 2 or "embedding" in name or "norm" in name or "layrnorm" in name:
        return False
    return not name.rsplit(".", 1)[-1].startswith("logit_")


LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature at 100

# Zhai et al. 2023 start SigLIP's learnable bias at -10 so that the many negatives of a batch begin
# near their target (sigmoid(-10) ~ 0) instead of dominating the first steps.
SIGLIP_LOGIT_BIAS_INIT = -10.0


def check_dtype(name: str | None) -> str:
    """The dtype name (float32 when None), or a ConfigError listing the valid ones."""
    if name is None:
        return "float32"
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


# --- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRules:
    """What one engine can run on: accelerators in order of preference, why each may be missing,
    and whether device names take an index (`cuda:1`)."""

    engine: str
    accelerators: tuple[str, ...]
    missing: dict[str, str]
    indexed: bool

    @property
    def names(self) -> tuple[str, ...]:
        return ("auto", "cpu", *sorted(self.accelerators))


DEVICE_RULES = {
    "mlx": DeviceRules("mlx", ("gpu",), {"gpu": "this MLX build has no GPU (Metal is not available)"}, indexed=False),
    "torch": DeviceRules("torch", ("mps", "cuda"), {"cuda": "CUDA is not available to this torch build",
                                                    "mps": "MPS is not available on this machine"}, indexed=True),
}


def choose_device(requested: str | None, engine: str, available: dict[str, bool]) -> str:
    """The device `engine` runs on: the first available accelerator for auto (or None), else the
    user's explicit choice, checked and never silently replaced. Returns a name like `cuda:1`."""
    rules = DEVICE_RULES[engine]
    choice = (requested or "auto").lower()
    match = re.fullmatch(r"(\w+)(:\d+)?", choice)
    kind = match.group(1) if match else None
    if kind not in rules.names or (match.group(2) and (kind == "auto" or not rules.indexed)):
        index_hint = " (or cuda:N)" if rules.indexed else ""
        raise ConfigError(f"--device must be one of {', '.join(rules.names)}{index_hint} for the {engine} engine, "
                          f"got {requested!r}")
    if kind == "auto":
        return next((name for name in rules.accelerators if available.get(name)), "cpu")
    if kind != "cpu" and not available.get(kind):
        raise ConfigError(f"--device {requested}: {rules.missing[kind]}")
    return choice


def cpu_streams() -> int:
    """How many slices the MLX engine cuts a batch into on the CPU, one stream (one core) each:
    MLX runs each stream's elementwise work on one thread, so one stream leaves the other cores
    idle between matmuls. `MLXCLIP_CPU_STREAMS` overrides; the usable cores, at most 8, otherwise."""
    override = os.environ.get("MLXCLIP_CPU_STREAMS", "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ConfigError(f"MLXCLIP_CPU_STREAMS must be a positive integer, got {override!r}")
        return int(override)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


# --- what a run trains ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class TrainingPlan:
    """What an engine sets up before the first step.

    frozen: top-level submodules of the CLIP whose parameters do not train;
    lora: adapters to add (everything else is then frozen, except `kept_trainable`);
    kept_trainable: top-level parameters that still train after LoRA's freeze;
    logit_bias: the initial SigLIP bias, None when the loss has none;
    loss_options: keyword arguments of the loss function beyond embeddings, scale and bias;
    probe_steps: LP-FT (Kumar et al. 2022): the first `probe_steps` updates train only `PROBED`
    (the "linear probe" of a contrastive model: both projections and the temperature, plus
    SigLIP's bias); then every parameter trains, with a fresh optimizer and a fresh schedule, as
    the paper's second stage. 0: one phase.
    """

    frozen: tuple[str, ...] = ()
    lora: LoraSpec | None = None
    kept_trainable: tuple[str, ...] = ()
    logit_bias: float | None = None
    loss_options: tuple[tuple[str, float], ...] = ()
    probe_steps: int = 0

    def phase_at(self, step: int) -> str:
        """The phase update number `step` (0-based) belongs to: "probe" or "full"."""
        return "probe" if step < self.probe_steps else "full"


# What trains in LP-FT's first phase, as paths in the model, those the model has: CLIP's two
# projections, SigLIP's two heads (its towers end in them instead), the temperature and SigLIP's
# bias. A logit_bias outside the model (the SigLIP loss on a CLIP) always trains with that loss.
PROBED = ("visual_projection", "text_projection", "text_model.head", "vision_model.head", "logit_scale",
          "logit_bias")
PHASES = ("probe", "full")


def parse_lora_targets(text: str) -> tuple[str, ...]:
    """`"q_proj, v_proj"` -> ("q_proj", "v_proj"); names are checked where LoRA is applied."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def default_loss(config) -> str:
    """The loss a model family is trained with: SigLIP's sigmoid loss for SigLIP, InfoNCE for CLIP."""
    # Our CLIPConfig and transformers' configs both name the family in `model_type`.
    return "siglip" if getattr(config, "model_type", "clip") in ("siglip", "siglip2") else "clip"


def for_model(cfg, config):
    """`cfg` (a TrainConfig) with `loss` set to the family's default when it was left unset; the
    options a family cannot take refused (`check_family_options`)."""
    import dataclasses

    check_family_options(cfg, config)
    return cfg if cfg.loss is not None else dataclasses.replace(cfg, loss=default_loss(config))


def check_patch_budget(config, max_num_patches: int | None, where: str = "--max-num-patches") -> None:
    """Refuse a patch budget for a model that has none (CLIP, SigLIP: square images)."""
    from mlx_clip.errors import ConfigError, check_int

    if max_num_patches is None:
        return
    if not config.is_naflex:
        raise ConfigError(f"{where} {max_num_patches}: only NaFlex SigLIP 2 models (model_type 'siglip2') take a "
                          f"patch budget; this model is {config.model_type!r} and takes square images: use "
                          "--image-size")
    check_int(where, max_num_patches, minimum=1)


def check_family_options(cfg, config) -> None:
    """NaFlex SigLIP 2 sizes each image to its own patch grid within --max-num-patches: the options
    that set a square size, or drop patches of one, have no meaning there, and a patch budget has
    none for the square families."""
    from mlx_clip.errors import ConfigError

    if not config.is_naflex:
        check_patch_budget(config, cfg.max_num_patches)
        return
    # --memory-budget's probe steps on square-grid stand-ins of the model's own patch count, which
    # need not be the run's budget: it would size the run on the wrong batch.
    square = {"--image-size": cfg.image_size is not None, "--resolution-schedule": bool(cfg.resolution_schedule),
              "--buckets": cfg.buckets, "--patch-dropout": bool(cfg.patch_dropout),
              "--memory-budget": bool(cfg.memory_budget)}
    used = [flag for flag, on in square.items() if on]
    if used:
        raise ConfigError(f"{', '.join(used)}: not for a NaFlex SigLIP 2 model (model_type 'siglip2'), which resizes "
                          "each image to its own patch grid, keeping its aspect ratio, and mixes aspect ratios in a "
                          "batch; set the patches per image with --max-num-patches instead")


def training_plan(cfg) -> TrainingPlan:
    """The plan for a `TrainConfig`."""
    frozen = {"lock-image": ("vision_model", "visual_projection"),
              "lock-text": ("text_model", "text_projection")}.get(cfg.strategy, ())
    lora = None
    kept: tuple[str, ...] = ()
    if cfg.strategy == "lora":
        lora = LoraSpec(cfg.lora_rank, cfg.lora_alpha, parse_lora_targets(cfg.lora_targets), cfg.seed)
        kept = ("logit_scale",)  # the temperature keeps adapting, as in full fine-tuning
    probe = cfg.lp_steps if cfg.strategy == "lp-ft" else 0
    if cfg.loss == "siglip":
        return TrainingPlan(frozen, lora, kept, SIGLIP_LOGIT_BIAS_INIT, probe_steps=probe)
    options = (("label_smoothing", cfg.label_smoothing), ("hard_negative_beta", cfg.hard_negative_beta))
    return TrainingPlan(frozen, lora, kept, None, options, probe)


# --- layer-wise learning-rate decay ----------------------------------------------------------
# BEiT (Bao et al. 2021) and timm's `param_groups_layer_decay`: within each tower, embeddings are
# layer 0, encoder layer i is i + 1 and everything after the last layer is depth + 1; a parameter's
# lr is scaled by decay ** (depth + 1 - layer), so the top trains at --lr and each layer below it
# a factor `decay` slower. Each tower counts its own depth (SigLIP's towers may differ).

# The model's top-level children that belong to a tower; anything else (logit_scale, logit_bias)
# sits after both towers and trains at the full rate.
TOWER_OF = {"vision_model": "vision", "visual_projection": "vision", "text_model": "text", "text_projection": "text"}
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_BELOW_LAYERS = ("embeddings.", "pre_layrnorm.")  # CLIP's vision tower normalises before its first layer


@dataclass(frozen=True)
class LayerPlace:
    """Where a parameter sits for layer-wise lr decay."""

    tower: str  # "vision", "text", or "shared" (after both towers)
    layer: int  # 0 below the encoder, i + 1 in encoder layer i, top after the last layer
    top: int  # the tower's depth + 1

    def lr_scale(self, decay: float) -> float:
        return decay ** (self.top - self.layer)


def tower_depths(config) -> dict[str, int]:
    """Encoder layers per tower of a model config (ours or transformers', same field names)."""
    return {"vision": config.vision_config.num_hidden_layers, "text": config.text_config.num_hidden_layers}


def layer_place(name: str, depths: dict[str, int]) -> LayerPlace:
    """The place of parameter `name`, a path in the model or in an engine's TrainModule ("clip."
    first). LoRA's tensors inside encoder layer i are in layer i + 1, as the Linear they adapt."""
    path = name.removeprefix("clip.")
    root, _, rest = path.partition(".")
    tower = TOWER_OF.get(root)
    if tower is None:
        top = max(depths.values()) + 1
        return LayerPlace("shared", top, top)
    top = depths[tower] + 1
    layer = _ENCODER_LAYER.match(rest)
    if layer:
        return LayerPlace(tower, int(layer.group(1)) + 1, top)
    if rest.startswith(_BELOW_LAYERS):
        return LayerPlace(tower, 0, top)
    return LayerPlace(tower, top, top)


def lr_scales(names, decay: float, depths: dict[str, int]) -> dict[str, float]:
    """Parameter name -> its lr multiplier (all 1.0 at decay 1)."""
    return {name: layer_place(name, depths).lr_scale(decay) for name in names}


def layer_decay_table(sizes: dict[str, int], decay: float, depths: dict[str, int]) -> list[dict]:
    """One row per (tower, layer) that holds any of `sizes` (name -> element count): tower,
    layer, lr_scale, parameters; towers in order, layers bottom up."""
    rows: dict[tuple[str, int], dict] = {}
    for name, size in sizes.items():
        place = layer_place(name, depths)
        row = rows.setdefault((place.tower, place.layer), {"tower": place.tower, "layer": place.layer,
                                                           "lr_scale": place.lr_scale(decay), "parameters": 0})
        row["parameters"] += int(size)
    order = {"vision": 0, "text": 1, "shared": 2}
    return [rows[key] for key in sorted(rows, key=lambda key: (order[key[0]], key[1]))]


def format_layer_decay_table(rows: list[dict], decay: float) -> str:
    lines = [f"layer-wise lr decay {decay}: lr x decay ** (depth + 1 - layer), per tower",
             f"  {'tower':8s} {'layer':>5s} {'lr scale':>10s} {'parameters':>12s}"]
    lines += [f"  {r['tower']:8s} {r['layer']:5d} {r['lr_scale']:10.6f} {r['parameters']:12,d}" for r in rows]
    return "\n".join(lines)
