"""CLIP and SigLIP architecture configs with Hugging Face field names.

`CLIPConfig.from_dict` reads a real `config.json` (as `transformers.CLIPConfig.save_pretrained`
writes it), tolerates keys it does not know and keeps them, so `to_dict` gives them back and a
config survives a round trip through mlxclip unchanged. Every architectural choice the model
makes comes from here; `model.py` holds no literal the config could supply.

Two families share one top-level `CLIPConfig` (the type every engine and command takes), told apart
by `model_type`: "clip" (`transformers.CLIPModel`: class token, causal text tower, projections)
and "siglip" (`transformers.SiglipModel`, which also loads the fixed-resolution SigLIP 2
checkpoints: no class token, attention-pooling image head, bidirectional text tower pooled at the
last position through a head, a learnable logit bias). Each family has its own tower dataclasses,
with transformers' fields and defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_clip.errors import ConfigError, check_int

SUPPORTED_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# MLX's affine quantization (`mlx_backend/quantize.py`): the bit widths `--quantize` writes and runs,
# and its group size, one scale and one bias per 64 consecutive weights of a row (MLX's and mlx-lm's
# default). A folder's "quantization" entry may hold any width and group size MLX's kernels take.
QUANTIZE_BITS = (8, 4)
QUANTIZE_GROUP_SIZE = 64
MLX_QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)


def check_quantize(bits, name: str = "--quantize") -> int | None:
    """`bits` if it is one of QUANTIZE_BITS (or None: float weights), else ConfigError naming it."""
    if bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and bits in QUANTIZE_BITS):
        return bits
    raise ConfigError(f"{name} must be one of {', '.join(map(str, QUANTIZE_BITS))} (bits per weight), got {bits!r}")


def describe_quantization(quantization: dict[str, Any]) -> str:
    return f"{quantization['bits']}-bit, group size {quantization['group_size']}"


def _check_quantization(value: Any) -> dict[str, Any] | None:
    """A config.json's "quantization" entry as mlx-lm writes it: {"group_size": G, "bits": B}
    (and, from newer mlx-lm, "mode": "affine"); None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"quantization must be an object with group_size and bits, got {value!r}")

    def allowed(number, values) -> bool:
        return isinstance(number, int) and not isinstance(number, bool) and number in values

    bits, group_size = value.get("bits"), value.get("group_size")
    if not allowed(bits, MLX_QUANTIZE_BITS):
        raise ConfigError(f"quantization.bits must be one of {', '.join(map(str, MLX_QUANTIZE_BITS))}, got {bits!r}")
    if not allowed(group_size, MLX_GROUP_SIZES):
        raise ConfigError(f"quantization.group_size must be one of {', '.join(map(str, MLX_GROUP_SIZES))}, "
                          f"got {group_size!r}")
    if value.get("mode", "affine") != "affine":
        raise ConfigError(f"quantization.mode must be 'affine' (scales and biases per group), got {value['mode']!r}")
    return dict(value)


def _split_known(cls, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
    known = {k: v for k, v in data.items() if k in names}
    extras = {k: v for k, v in data.items() if k not in names}
    return known, extras


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        check_int(f"{owner}.{name}", value, minimum=1)


def _check_common(owner: str, cfg) -> None:
    _check_positive(owner, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_hidden_layers,
                    num_attention_heads=cfg.num_attention_heads)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{owner}.hidden_size ({cfg.hidden_size}) must be a multiple of "
                          f"num_attention_heads ({cfg.num_attention_heads})")
    if cfg.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{owner}.hidden_act must be one of {', '.join(SUPPORTED_ACTIVATIONS)}, "
                          f"got {cfg.hidden_act!r}")
    if not isinstance(cfg.layer_norm_eps, (int, float)) or cfg.layer_norm_eps <= 0:
        raise ConfigError(f"{owner}.layer_norm_eps must be a positive number, got {cfg.layer_norm_eps!r}")


class _TowerConfig:
    """What the text and vision configs share: tolerant reading, validation on read, round trip."""

    MODEL_TYPE = ""
    SECTION = ""

    @classmethod
    def _normalize(cls, known: dict[str, Any]) -> dict[str, Any]:
        return known

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known, extras = _split_known(cls, data)
        cfg = cls(**cls._normalize(known), extras=extras)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _check_common(self.SECTION, self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        out = {**self.extras, **{k: v for k, v in dataclasses.asdict(self).items() if k != "extras"}}
        out["model_type"] = self.MODEL_TYPE
        return out


@dataclass
class CLIPTextConfig(_TowerConfig):
    MODEL_TYPE = "clip_text_model"
    SECTION = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # transformers pools the EOT state at argmax(input_ids) when eos_token_id == 2 (configs written
    # before its PR #24773) and at the first eos_token_id otherwise; we follow the same rule.
    eos_token_id: int = 49407
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        super().validate()
        _check_positive(self.SECTION, vocab_size=self.vocab_size,
                        max_position_embeddings=self.max_position_embeddings)


class _VisionChecks:
    """Square image and patch sizes. The patch grid is floor(image_size / patch_size) a side, as the
    stride-`patch_size` convolution gives in transformers and timm: google/siglip-so400m-patch14-384
    has 27 patches of 14 px and leaves the last 6 px of each side unused."""

    @classmethod
    def _normalize(cls, known: dict[str, Any]) -> dict[str, Any]:
        for key in ("image_size", "patch_size"):
            value = known.get(key)
            # transformers 5 allows [h, w]; a square pair is the same model.
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ConfigError(f"vision_config.{key} must be square, got {value!r}")
                known[key] = value[0]
        return known

    def validate(self) -> None:
        super().validate()
        _check_positive(self.SECTION, image_size=self.image_size, patch_size=self.patch_size,
                        num_channels=self.num_channels)
        if self.image_size < self.patch_size:
            raise ConfigError(f"vision_config.image_size ({self.image_size}) must be at least patch_size "
                              f"({self.patch_size})")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class CLIPVisionConfig(_VisionChecks, _TowerConfig):
    MODEL_TYPE = "clip_vision_model"
    SECTION = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_positions(self) -> int:
        return self.grid ** 2 + 1  # the class token, then the patches


@dataclass
class SiglipTextConfig(_TowerConfig):
    """`transformers.SiglipTextConfig`: no projection; `head` maps the last position's state to
    `projection_size` (the hidden size when unset)."""

    MODEL_TYPE = "siglip_text_model"
    SECTION = "text_config"

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    projection_size: int | None = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.projection_size is None:
            self.projection_size = self.hidden_size

    def validate(self) -> None:
        super().validate()
        _check_positive(self.SECTION, vocab_size=self.vocab_size, projection_size=self.projection_size,
                        max_position_embeddings=self.max_position_embeddings)


@dataclass
class _SiglipVision(_TowerConfig):
    """What both SigLIP vision towers share (transformers' fields and defaults): patches without a
    class token, pooled by the multihead-attention head (`vision_use_head`)."""

    SECTION = "vision_config"
    ARCHITECTURE = ""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        super().validate()
        if self.vision_use_head is not True:
            raise ConfigError("vision_config.vision_use_head must be true: without the attention-pooling head "
                              f"{self.ARCHITECTURE} has no image embedding, got {self.vision_use_head!r}")


@dataclass
class SiglipVisionConfig(_VisionChecks, _SiglipVision):
    """`transformers.SiglipVisionConfig`: a square image of `image_size`."""

    MODEL_TYPE = "siglip_vision_model"
    ARCHITECTURE = "SiglipModel"

    image_size: int = 224

    @property
    def num_positions(self) -> int:
        return self.grid ** 2  # patches only


@dataclass
class Siglip2TextConfig(SiglipTextConfig):
    """`transformers.Siglip2TextConfig`: the SigLIP text tower, fields and defaults unchanged."""

    MODEL_TYPE = "siglip2_text_model"


@dataclass
class Siglip2VisionConfig(_SiglipVision):
    """`transformers.Siglip2VisionConfig` (NaFlex): no image size; `num_patches` position embeddings
    form a square grid, resized to each image's patch grid (`mlx_clip/model/naflex.py`)."""

    MODEL_TYPE = "siglip2_vision_model"
    ARCHITECTURE = "Siglip2Model"

    num_patches: int = 256

    @classmethod
    def _normalize(cls, known: dict[str, Any]) -> dict[str, Any]:
        value = known.get("patch_size")
        if isinstance(value, (list, tuple)):  # transformers allows [p, p]
            if len(value) != 2 or value[0] != value[1]:
                raise ConfigError(f"vision_config.patch_size must be square, got {value!r}")
            known["patch_size"] = value[0]
        return known

    def validate(self) -> None:
        super().validate()
        _check_positive(self.SECTION, patch_size=self.patch_size, num_channels=self.num_channels,
                        num_patches=self.num_patches)
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ConfigError(f"vision_config.num_patches must be a square number (the position embeddings are a "
                              f"square grid), got {self.num_patches}")

    @property
    def grid(self) -> int:
        """The side of the square position-embedding grid."""
        return math.isqrt(self.num_patches)

    @property
    def image_size(self) -> int:
        """The square image whose patch grid is the position table's (256 px for a 16-px, 256-patch
        model): what the model saw most in pre-training, and the size figures quote. Images are not
        resized to it: each keeps its aspect ratio within `--max-num-patches`."""
        return self.grid * self.patch_size

    @property
    def num_positions(self) -> int:
        return self.num_patches

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: (patch_size, patch_size, num_channels), row-major."""
        return self.patch_size * self.patch_size * self.num_channels


MODEL_TYPES = ("clip", "siglip", "siglip2")
# Which tower classes each family reads, and the architecture transformers names in config.json.
_TOWERS = {"clip": (CLIPTextConfig, CLIPVisionConfig, "CLIPModel"),
           "siglip": (SiglipTextConfig, SiglipVisionConfig, "SiglipModel"),
           "siglip2": (Siglip2TextConfig, Siglip2VisionConfig, "Siglip2Model")}
# Top-level fields that only CLIP's config.json carries.
_CLIP_ONLY = ("projection_dim", "logit_scale_init_value")


@dataclass
class CLIPConfig:
    """A whole model of any family (`model_type` "clip", "siglip" or "siglip2", NaFlex). For the
    SigLIPs, `projection_dim` is the embedding width the towers' heads produce (derived, not written)."""

    text_config: CLIPTextConfig | SiglipTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig | SiglipVisionConfig | Siglip2VisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    model_type: str = "clip"
    # MLX-quantized weights (mlx-lm's entry, `mlx_backend/quantize.py`): {"group_size", "bits"}, or
    # None for float weights. Only the MLX engine runs such a folder, and only for inference.
    quantization: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.is_siglip:
            self.projection_dim = self.vision_config.hidden_size

    @property
    def is_siglip(self) -> bool:
        """The sigmoid family (SigLIP and NaFlex SigLIP 2): its loss, tokenizer, bias and heads."""
        return self.model_type in ("siglip", "siglip2")

    @property
    def is_naflex(self) -> bool:
        """NaFlex SigLIP 2: images enter as patches (`naflex.pack`), not as square pixels."""
        return self.model_type == "siglip2"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "CLIPConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ConfigError(f"{source} is not a CLIP, SigLIP or SigLIP 2 config (model_type={model_type!r}, "
                              f"expected one of {', '.join(map(repr, MODEL_TYPES))})")
        if model_type is None and not ("text_config" in data and "vision_config" in data):
            raise ConfigError(f"{source} is not a CLIP config (no model_type, text_config or vision_config)")
        family = model_type or "clip"
        text_cls, vision_cls, _ = _TOWERS[family]
        known, extras = _split_known(cls, data)
        known.pop("model_type", None)
        if family != "clip":
            extras.update({k: known.pop(k) for k in _CLIP_ONLY if k in known})
        try:
            text = text_cls.from_dict(known.pop("text_config", None) or {})
            vision = vision_cls.from_dict(known.pop("vision_config", None) or {})
            cfg = cls(text_config=text, vision_config=vision, **known, model_type=family, extras=extras)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        _check_positive("config", projection_dim=cfg.projection_dim)
        try:
            cfg.quantization = _check_quantization(cfg.quantization)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        if family != "clip" and text.projection_size != vision.hidden_size:
            raise ConfigError(f"{source}: text_config.projection_size ({text.projection_size}) must equal "
                              f"vision_config.hidden_size ({vision.hidden_size}): SigLIP compares the two "
                              "towers' pooled states directly")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "CLIPConfig":
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        architecture = _TOWERS[self.model_type][2]
        out = dict(self.extras)
        out.update({
            "architectures": self.extras.get("architectures", [architecture]),
            "model_type": self.model_type,
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
        })
        if not self.is_siglip:
            out.update(projection_dim=self.projection_dim, logit_scale_init_value=self.logit_scale_init_value)
        if self.quantization is not None:
            out["quantization"] = dict(self.quantization)
        return out

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


def read_json(path: str | Path) -> Any:
    """A JSON file's content, or a ConfigError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def tiny_config(**overrides: Any) -> CLIPConfig:
    """A small CLIP for tests and the built-in demo: 2 layers of width 64 per tower, 32 px images in
    8 px patches."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                projection_dim=64, hidden_act="quick_gelu")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=64, hidden_act="quick_gelu")
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    return CLIPConfig(text_config=CLIPTextConfig(**text), vision_config=CLIPVisionConfig(**vision),
                      projection_dim=overrides.pop("projection_dim", 64), **overrides)


def siglip_tiny_config(vocab_size: int = 1024, **overrides: Any) -> CLIPConfig:
    """A small SigLIP for tests and the built-in demo: 2 layers of width 64 per tower, 16-token
    text, 32 px images in 8 px patches."""
    return _tiny_sigmoid_family("siglip", vocab_size, {"image_size": 32}, overrides)


def siglip2_naflex_tiny_config(vocab_size: int = 1024, **overrides: Any) -> CLIPConfig:
    """A small NaFlex SigLIP 2 for tests and the built-in demo: siglip_tiny_config's towers, with
    8 px patches on a 4x4 position grid (a 32 px square's)."""
    return _tiny_sigmoid_family("siglip2", vocab_size, {"num_patches": 16}, overrides)


def _tiny_sigmoid_family(model_type: str, vocab_size: int, grid: dict[str, int], overrides: dict[str, Any]) -> CLIPConfig:
    # Token ids of `siglip_tokenizer.build_demo_tokenizer`: `</s>` (1) ends and pads every row.
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=1, eos_token_id=1,
                bos_token_id=None)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                  **grid)
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    text_class, vision_class, _ = _TOWERS[model_type]
    return CLIPConfig(text_config=text_class(**text), vision_config=vision_class(**vision), model_type=model_type,
                      **overrides)
