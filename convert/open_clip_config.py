"""open_clip's `model_cfg` <-> our Hugging Face-named `CLIPConfig`.

The field meanings and defaults are open_clip's (`open_clip/model.py`: `CLIPVisionCfg`,
`CLIPTextCfg`, `_build_vision_tower`, `_build_text_tower`): vision heads = width // head_width,
MLP width = int(width * mlp_ratio), one `quick_gelu` flag for both towers, LayerNorm eps from
`norm_kwargs` (torch's default 1e-5 otherwise). Only configs a `transformers.CLIPModel` computes
exactly are accepted; anything else (layer scale, attentional pooling, HF towers, ...) is a
ConfigError naming the field. Models with a timm image trunk (open_clip's SigLIP) are mapped by
`convert/open_clip_siglip.py`, which shares the field helpers below.

The original open_clip config travels in the HF config under `open_clip_config`, so a round trip
gives back the same `open_clip_config.json` (preprocess_cfg and tokenizer fields included).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlx_clip.convert.shapes import Shape
from mlx_clip.model.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, read_json
from mlx_clip.errors import ConfigError, ConvertError

OPEN_CLIP_CONFIG = "open_clip_config.json"
EXTRAS_KEY = "open_clip_config"
TORCH_LAYER_NORM_EPS = 1e-5
# transformers pools at argmax(input_ids) when eos_token_id == 2: open_clip's 'argmax' pooling.
ARGMAX_EOS = 2

VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224)
TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                     pool_type="argmax", eos_id=2)
_CUSTOM_BLOCK = dict(block_type=(None, "default"), qk_norm=(False,), scaled_cosine_attn=(False,),
                     scale_heads=(False,), scale_attn_inner=(False,), scale_attn=(False,), scale_fc=(False,))
# Fields whose other values change the computation in ways a HF CLIPModel cannot express.
# `final_ln_after_pool` is absent on purpose: LayerNorm is per token, so for class-token / EOT
# pooling it commutes with the pooling.
VISION_FIXED = dict(ls_init_value=(None,), attentional_pool=(False,), no_ln_pre=(False,),
                    pos_embed_type=("learnable",), pool_type=("tok",), timm_model_name=(None,), **_CUSTOM_BLOCK)
TEXT_FIXED = dict(ls_init_value=(None,), embed_cls=(False,), no_causal_mask=(False,),
                  pool_type=("argmax", "eos"), proj_bias=(False,), proj_type=("linear",),
                  hf_model_name=(None,), **_CUSTOM_BLOCK)


@dataclass(frozen=True)
class OpenClipLayout:
    """What the state-dict names and shapes depend on besides the architecture."""

    text_prefix: str  # "text." for CustomTextCLIP
    logit_scale_shape: Shape
    has_logit_bias: bool


def layout_of(model_cfg: dict[str, Any]) -> OpenClipLayout:
    scalar: Shape = (1,) if model_cfg.get("nonscalar_logit_scale") else ()
    return OpenClipLayout("text." if model_cfg.get("custom_text") else "", scalar,
                          model_cfg.get("init_logit_bias") is not None)


def read_open_clip_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ConfigError(f"{path}: expected a JSON object with a 'model_cfg' object, as open_clip writes")
    return data


def _square(source: str, key: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{source}: {key} must be square, got {value!r}")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _check_fixed(source: str, owner: str, cfg: dict[str, Any], fixed: dict[str, tuple],
                 model: str = "CLIPModel") -> None:
    for key, allowed in fixed.items():
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise ConfigError(f"{source}: model_cfg.{owner}.{key}={value!r} is not supported "
                              f"(a Hugging Face {model} needs {' or '.join(map(repr, allowed))})")


def _activation(source: str, owner: str, cfg: dict[str, Any], quick_gelu: bool) -> str:
    kwargs = cfg.get("act_kwargs") or {}
    if not kwargs:
        return "quick_gelu" if quick_gelu else "gelu"
    if not quick_gelu and kwargs == {"approximate": "tanh"}:
        return "gelu_pytorch_tanh"
    raise ConfigError(f"{source}: model_cfg.{owner}.act_kwargs={kwargs!r} is not supported")


def _eps(source: str, owner: str, cfg: dict[str, Any]) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise ConfigError(f"{source}: model_cfg.{owner}.norm_kwargs={kwargs!r} is not supported (only eps)")
    return kwargs.get("eps", TORCH_LAYER_NORM_EPS)


def _mlp(source: str, owner: str, width: int, cfg: dict[str, Any], defaults: dict[str, Any]) -> int:
    ratio = cfg.get("mlp_ratio", defaults["mlp_ratio"])
    if not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ConfigError(f"{source}: model_cfg.{owner}.mlp_ratio must be a positive number, got {ratio!r}")
    return int(width * ratio)  # as ResidualAttentionBlock computes it


def tower_cfgs(data: dict[str, Any], source: str, vision_defaults: dict[str, Any]) -> tuple[dict, dict, dict]:
    """model_cfg and its vision_cfg / text_cfg over open_clip's defaults; CoCa refused."""
    model_cfg = data["model_cfg"]
    if model_cfg.get("multimodal_cfg"):
        raise ConfigError(f"{source}: model_cfg.multimodal_cfg (CoCa) is not supported")
    return (model_cfg, {**vision_defaults, **(model_cfg.get("vision_cfg") or {})},
            {**TEXT_DEFAULTS, **(model_cfg.get("text_cfg") or {})})


def clip_config_from_open_clip(data: dict[str, Any], source: str = OPEN_CLIP_CONFIG) -> CLIPConfig:
    """An open_clip_config.json (as loaded) -> the equivalent CLIPConfig."""
    model_cfg, vision, text = tower_cfgs(data, source, VISION_DEFAULTS)
    if vision.get("timm_model_name"):
        raise ConfigError(f"{source}: model_cfg.vision_cfg.timm_model_name={vision['timm_model_name']!r}: a timm "
                          "image trunk is open_clip's SigLIP layout, read as model_type 'siglip' by "
                          "mlx_clip.convert.open_clip_siglip.siglip_config_from_open_clip, not as a CLIP")
    _check_fixed(source, "vision_cfg", vision, VISION_FIXED)
    _check_fixed(source, "text_cfg", text, TEXT_FIXED)
    if not isinstance(vision["layers"], int) or isinstance(vision["layers"], bool):
        raise ConfigError(f"{source}: model_cfg.vision_cfg.layers={vision['layers']!r} (a ResNet) is not supported")
    embed_dim = model_cfg.get("embed_dim")
    if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim <= 0:
        raise ConfigError(f"{source}: model_cfg.embed_dim must be a positive integer, got {embed_dim!r}")
    quick = bool(model_cfg.get("quick_gelu", False))
    v_width, head_width = vision["width"], vision["head_width"]
    if not all(isinstance(x, int) and x > 0 for x in (v_width, head_width)) or v_width % head_width:
        raise ConfigError(f"{source}: model_cfg.vision_cfg.width ({v_width!r}) must be a positive multiple "
                          f"of head_width ({head_width!r})")
    pool = text["pool_type"]
    eos = ARGMAX_EOS if pool == "argmax" else text["eos_id"]
    if pool == "eos" and eos == ARGMAX_EOS:
        raise ConfigError(f"{source}: model_cfg.text_cfg.eos_id=2 with pool_type 'eos' is not supported "
                          "(transformers treats eos_token_id 2 as argmax pooling)")
    t_width = text["width"]
    try:
        text_config = CLIPTextConfig.from_dict(dict(
            vocab_size=text["vocab_size"], hidden_size=t_width,
            intermediate_size=_mlp(source, "text_cfg", t_width, text, TEXT_DEFAULTS),
            projection_dim=embed_dim, num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
            max_position_embeddings=text["context_length"],
            hidden_act=_activation(source, "text_cfg", text, quick),
            layer_norm_eps=_eps(source, "text_cfg", text), eos_token_id=eos))
        size = _square(source, "model_cfg.vision_cfg.image_size", vision["image_size"])
        patch = _square(source, "model_cfg.vision_cfg.patch_size", vision["patch_size"])
        vision_config = CLIPVisionConfig.from_dict(dict(
            hidden_size=v_width, intermediate_size=_mlp(source, "vision_cfg", v_width, vision, VISION_DEFAULTS),
            projection_dim=embed_dim, num_hidden_layers=vision["layers"],
            num_attention_heads=v_width // head_width, num_channels=3, image_size=size, patch_size=patch,
            hidden_act=_activation(source, "vision_cfg", vision, quick),
            layer_norm_eps=_eps(source, "vision_cfg", vision)))
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
    top: dict[str, Any] = {}
    if isinstance(model_cfg.get("init_logit_scale"), (int, float)):
        top["logit_scale_init_value"] = float(model_cfg["init_logit_scale"])
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                      extras={EXTRAS_KEY: copy.deepcopy(data)}, **top)


def _architecture(config: CLIPConfig) -> tuple:
    t, v = config.text_config, config.vision_config
    return (config.projection_dim,
            *(getattr(t, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "max_position_embeddings", "hidden_act",
                                      "layer_norm_eps", "eos_token_id")),
            *(getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_channels", "image_size", "patch_size",
                                      "hidden_act", "layer_norm_eps")))


def _mlp_ratio(width: int, inner: int) -> float:
    ratio = inner / width
    # open_clip truncates int(width * ratio); nudge the ratio when float rounding would land below.
    return ratio if int(width * ratio) == inner else (inner + 0.5) / width


def _tower_activation(config: CLIPConfig) -> tuple[bool, dict | None]:
    acts = {config.text_config.hidden_act, config.vision_config.hidden_act}
    if acts == {"quick_gelu"}:
        return True, None
    if acts == {"gelu"}:
        return False, None
    if acts == {"gelu_pytorch_tanh"}:
        return False, {"approximate": "tanh"}
    raise ConvertError(f"open_clip uses one activation for both towers, from quick_gelu, gelu or "
                       f"gelu_pytorch_tanh; this model has text {config.text_config.hidden_act!r} and "
                       f"vision {config.vision_config.hidden_act!r}")


def fresh_model_cfg(config: CLIPConfig) -> dict[str, Any]:
    t, v = config.text_config, config.vision_config
    quick, act_kwargs = _tower_activation(config)
    if v.num_channels != 3:
        raise ConvertError(f"open_clip's patch embedding takes 3 channels, this model has {v.num_channels}")
    vision = dict(image_size=v.image_size, layers=v.num_hidden_layers, width=v.hidden_size,
                  patch_size=v.patch_size, head_width=v.head_dim,
                  mlp_ratio=_mlp_ratio(v.hidden_size, v.intermediate_size))
    text = dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                heads=t.num_attention_heads, layers=t.num_hidden_layers,
                mlp_ratio=_mlp_ratio(t.hidden_size, t.intermediate_size))
    if t.eos_token_id != ARGMAX_EOS:
        text.update(pool_type="eos", eos_id=t.eos_token_id)
    for cfg, tower in ((vision, v), (text, t)):
        if act_kwargs:
            cfg["act_kwargs"] = dict(act_kwargs)
        if tower.layer_norm_eps != TORCH_LAYER_NORM_EPS:
            cfg["norm_kwargs"] = {"eps": tower.layer_norm_eps}
    return dict(embed_dim=config.projection_dim, quick_gelu=quick, vision_cfg=vision, text_cfg=text)


def kept_or_derived(config: CLIPConfig, read: Callable[[dict, str], CLIPConfig], architecture: Callable[[CLIPConfig], tuple],
                    derive: Callable[[dict[str, Any] | None], dict[str, Any]],
                    preprocess_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """open_clip_config.json data for `config`: the original file it was read from (kept in its
    extras) when reading that back gives the same architecture, so a round trip changes nothing; else
    the original's other keys with `derive(original model_cfg or None)`. `preprocess_cfg` where the
    data has none."""
    original = config.extras.get(EXTRAS_KEY)
    if isinstance(original, dict) and isinstance(original.get("model_cfg"), dict):
        data = copy.deepcopy(original)
        try:
            same = architecture(read(original, EXTRAS_KEY)) == architecture(config)
        except ConfigError:
            same = False
        if not same:
            data["model_cfg"] = derive(original["model_cfg"])
    else:
        data = {"model_cfg": derive(None)}
    if preprocess_cfg and "preprocess_cfg" not in data:
        data["preprocess_cfg"] = preprocess_cfg
    return data


def open_clip_config_for(config: CLIPConfig, logit_bias: float | None = None,
                         preprocess_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The open_clip_config.json for a CLIP `config` (see `kept_or_derived`)."""
    data = kept_or_derived(config, clip_config_from_open_clip, _architecture, lambda _: fresh_model_cfg(config),
                           preprocess_cfg)
    model_cfg = data["model_cfg"]
    if logit_bias is None:
        model_cfg.pop("init_logit_bias", None)
    elif model_cfg.get("init_logit_bias") is None:
        model_cfg["init_logit_bias"] = logit_bias
    return data


# transformers' `resample` (PIL's codes) -> open_clip's `interpolation`.
INTERPOLATIONS = {2: "bilinear", 3: "bicubic"}


def preprocess_cfg_from_hf(folder: Path, siglip: bool = False) -> dict[str, Any] | None:
    """open_clip's preprocess_cfg (mean, std) from a Hugging Face preprocessor_config.json; for
    SigLIP also how it resizes (open_clip's SigLIP configs say `resize_mode` 'squash', bicubic)."""
    path = folder / "preprocessor_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("image_mean"), list)
            and isinstance(data.get("image_std"), list)):
        return None
    out: dict[str, Any] = {"mean": data["image_mean"], "std": data["image_std"]}
    if siglip:
        if data.get("resample") in INTERPOLATIONS:
            out["interpolation"] = INTERPOLATIONS[data["resample"]]
        size = data.get("size")
        crop = data.get("do_center_crop", isinstance(size, dict) and "shortest_edge" in size)
        out["resize_mode"] = "shortest" if crop else "squash"  # CLIP's crop, or SiglipImageProcessor's resize
    return out
