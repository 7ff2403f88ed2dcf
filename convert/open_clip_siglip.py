"""open_clip's SigLIP models <-> our SigLIP `CLIPConfig` (transformers.SiglipModel): config and names.

An open_clip SigLIP (`open_clip/model_configs/ViT-*-SigLIP*.json`) is a `CustomTextCLIP` whose
image tower is a timm ViT (`vision_cfg.timm_model_name`, pooled by timm's 'map' attention pool,
no projection) and whose text tower is open_clip's own `TextTransformer` without causal mask,
pooled at the last position through a biased linear projection. Both map onto SiglipModel
tensor for tensor; every transform only moves bytes (a split of timm's fused qkv, a concatenation
of the attention pool's separate q and fused kv, reshapes of the position embedding and the
scalars), so a round trip gives back the same bits in any dtype.

The timm trunk's architecture comes from `mlx_clip.convert.timm_siglip`; writing open_clip needs a named
timm model of the same architecture (open_clip builds the tower from the name alone).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from mlx_clip.convert.names import FUSED_QKV, IDENTITY, LAYER_TABLE, QKV_PROJ, Transform, weight_and_bias
from mlx_clip.convert.open_clip_config import (_CUSTOM_BLOCK, EXTRAS_KEY, OPEN_CLIP_CONFIG, TEXT_DEFAULTS, TORCH_LAYER_NORM_EPS,
                                      _activation, _check_fixed, _eps, _mlp, _mlp_ratio, _square, kept_or_derived,
                                      tower_cfgs)
from mlx_clip.convert.safetensors_io import Tensor
from mlx_clip.convert.shapes import Shape
from mlx_clip.convert.timm_siglip import KNOWN_TRUNKS, SIGLIP_POOL, TimmTrunk, timm_name_for, trunk_of
from mlx_clip.model.config import CLIPConfig, SiglipTextConfig, SiglipVisionConfig
from mlx_clip.errors import ConfigError, ConvertError

# open_clip's CLIPVisionCfg defaults for the fields a timm tower reads (the others it ignores).
VISION_DEFAULTS = dict(image_size=224, timm_pool="avg", timm_proj="linear")
# SiglipModel's vision tower ends at the pool: no projection after it.
VISION_FIXED = dict(timm_pool=(SIGLIP_POOL,), timm_proj=("none",))
TEXT_FIXED = dict(no_causal_mask=(True,), pool_type=("last",), proj_bias=(True,), proj_type=("linear",),
                  ls_init_value=(None,), embed_cls=(False,), hf_model_name=(None,), **_CUSTOM_BLOCK)
# Text fields that name the tokenizer, not the architecture: kept when a model_cfg is rebuilt.
TOKENIZER_FIELDS = ("hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode")
_TEXT_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_size")


def has_timm_trunk(model_cfg: dict[str, Any]) -> bool:
    """Whether an open_clip model_cfg builds its image tower from timm (open_clip's SigLIP)."""
    return bool((model_cfg.get("vision_cfg") or {}).get("timm_model_name"))


def siglip_config_from_open_clip(data: dict[str, Any], source: str = OPEN_CLIP_CONFIG) -> CLIPConfig:
    """An open_clip_config.json (as loaded) with a timm trunk -> the equivalent SigLIP CLIPConfig."""
    model_cfg, vision, text = tower_cfgs(data, source, VISION_DEFAULTS)
    name = vision["timm_model_name"]
    field = f"{source}: model_cfg.vision_cfg.timm_model_name"
    if not isinstance(name, str):
        raise ConfigError(f"{field} must be a timm model name, got {name!r}")
    _check_fixed(source, "vision_cfg", vision, VISION_FIXED, model="SiglipModel")
    trunk = trunk_of(name, f"{field}={name!r}")
    size = _square(source, "model_cfg.vision_cfg.image_size", vision["image_size"])
    if size != trunk.image_size:
        raise ConfigError(f"{source}: model_cfg.vision_cfg.image_size={size}, but timm's {name} takes "
                          f"{trunk.image_size} px images (open_clip builds the trunk from its name, not the size)")
    _check_fixed(source, "text_cfg", text, TEXT_FIXED, model="SiglipModel")
    embed_dim = model_cfg.get("embed_dim")
    if embed_dim != trunk.hidden_size:
        raise ConfigError(f"{source}: model_cfg.embed_dim must equal the width of timm's {name} "
                          f"({trunk.hidden_size}): with timm_proj 'none' the image embedding is the pooled trunk "
                          f"state, which SigLIP compares with the text's directly; got {embed_dim!r}")
    if not isinstance(model_cfg.get("init_logit_bias"), (int, float)):
        raise ConfigError(f"{source}: model_cfg.init_logit_bias is not set: open_clip then has no logit_bias, "
                          "which SiglipModel always has")
    quick = bool(model_cfg.get("quick_gelu", False))  # open_clip's text tower only: timm ignores it
    try:
        text_config = SiglipTextConfig.from_dict(dict(
            vocab_size=text["vocab_size"], hidden_size=text["width"],
            intermediate_size=_mlp(source, "text_cfg", text["width"], text, TEXT_DEFAULTS),
            num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
            max_position_embeddings=text["context_length"], hidden_act=_activation(source, "text_cfg", text, quick),
            layer_norm_eps=_eps(source, "text_cfg", text), projection_size=embed_dim,
            # SigLIP's SentencePiece ids: `</s>` (1) ends and pads every row, no start token.
            # Metadata only: the tower pools the last position whatever the ids.
            pad_token_id=1, eos_token_id=1, bos_token_id=None))
        vision_config = SiglipVisionConfig.from_dict(trunk.vision_config())
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
    return CLIPConfig(text_config=text_config, vision_config=vision_config, model_type="siglip",
                      extras={EXTRAS_KEY: copy.deepcopy(data)})


def _architecture(config: CLIPConfig) -> tuple:
    v = config.vision_config
    return (*(getattr(config.text_config, k) for k in _TEXT_ARCHITECTURE), TimmTrunk.of(v), v.num_channels)


def fresh_model_cfg(config: CLIPConfig, logit_bias: float, keep_text: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model_cfg open_clip builds this SigLIP from: the timm trunk named by its architecture,
    and a text tower as open_clip's SigLIP configs declare it (`keep_text`: tokenizer fields)."""
    t, v = config.text_config, config.vision_config
    trunk = TimmTrunk.of(v)
    name = timm_name_for(trunk)
    if name is None or v.num_channels != 3:
        raise ConvertError(f"open_clip builds SigLIP vision towers from a named timm model, and no timm SigLIP model "
                           f"has this one's architecture ({trunk.describe()}, {v.num_channels} channels); the known "
                           f"trunks are {', '.join(KNOWN_TRUNKS)}")
    act_kwargs = None
    if t.hidden_act == "gelu_pytorch_tanh":
        act_kwargs = {"approximate": "tanh"}
    elif t.hidden_act not in ("gelu", "quick_gelu"):
        raise ConvertError(f"open_clip's text tower runs gelu, quick_gelu or tanh-approximated gelu, this model's "
                           f"text_config.hidden_act is {t.hidden_act!r}")
    text = dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                heads=t.num_attention_heads, layers=t.num_hidden_layers,
                mlp_ratio=_mlp_ratio(t.hidden_size, t.intermediate_size),
                no_causal_mask=True, proj_bias=True, pool_type="last",
                **{k: v for k, v in (keep_text or {}).items() if k in TOKENIZER_FIELDS})
    if t.layer_norm_eps != TORCH_LAYER_NORM_EPS:
        text["norm_kwargs"] = {"eps": t.layer_norm_eps}
    if act_kwargs:
        text["act_kwargs"] = act_kwargs
    model_cfg: dict[str, Any] = dict(embed_dim=t.projection_size, init_logit_bias=logit_bias, custom_text=True)
    if t.hidden_act == "quick_gelu":
        model_cfg["quick_gelu"] = True
    model_cfg["vision_cfg"] = dict(image_size=v.image_size, timm_model_name=name, timm_model_pretrained=False,
                                   timm_pool=SIGLIP_POOL, timm_proj="none")
    model_cfg["text_cfg"] = text
    return model_cfg


def open_clip_config_for(config: CLIPConfig, logit_bias: float,
                         preprocess_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The open_clip_config.json for a SigLIP `config` (see `kept_or_derived`); a derived model_cfg
    keeps the original's tokenizer fields."""
    return kept_or_derived(
        config, siglip_config_from_open_clip, _architecture,
        lambda original: fresh_model_cfg(config, logit_bias, original.get("text_cfg") if original else None),
        preprocess_cfg)


# ---------------------------------------------------------------- tensor names


@dataclass(frozen=True)
class Regroup:
    """open_clip arrays <-> HF arrays, by byte moves only; `open_clip_shapes` gives the open_clip
    shapes implied by the HF shapes."""

    name: str
    to_hf: Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]
    to_open_clip: Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]
    open_clip_shapes: Callable[[tuple[Shape, ...]], tuple[Shape, ...]]


def _single(t: Transform) -> Regroup:
    return Regroup(t.name, lambda a: t.to_hf(a[0]), lambda hf: (t.to_open_clip(hf),),
                   lambda s: (t.open_clip_shape(s),))


SAME = _single(IDENTITY)
QKV = _single(FUSED_QKV)  # timm's Attention reshapes qkv's output as (B, N, 3, heads, head_dim): rows [q; k; v]
# timm's AttentionPoolLatent projects the latent query with `q` (D, D) and the tokens with `kv`
# (2D, D), rows [k; v] (its output reshaped (B, N, 2, heads, head_dim)); nn.MultiheadAttention's
# in_proj rows are [q; k; v].
LATENT_Q_KV = Regroup("q+kv", lambda a: (np.concatenate(a, axis=0),),
                      lambda hf: tuple(np.split(hf[0], [hf[0].shape[0] // 3], axis=0)),
                      lambda s: ((s[0][0] // 3, *s[0][1:]), (s[0][0] - s[0][0] // 3, *s[0][1:])))
# timm keeps the position embedding batched, (1, N, D); transformers as an nn.Embedding, (N, D).
BATCHED = Regroup("batched", lambda a: (a[0].reshape(a[0].shape[1:]),),
                  lambda hf: (hf[0].reshape((1, *hf[0].shape)),), lambda s: ((1, *s[0]),))


def scalar(open_clip_shape: Shape) -> Regroup:
    """SiglipModel keeps logit_scale and logit_bias as (1,); open_clip as () (or (1,) with
    `nonscalar_logit_scale`)."""
    return Regroup(f"reshape{open_clip_shape}", lambda a: (a[0].reshape((1,)),),
                   lambda hf: (hf[0].reshape(open_clip_shape),), lambda s: (open_clip_shape,))


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    open_clip: tuple[str, ...]
    regroup: Regroup


def _pair(hf: str, oc: str) -> list[tuple]:
    return weight_and_bias(hf, oc, SAME)


# One timm block: HF suffix(es) <- timm suffix(es).
TRUNK_LAYER = [
    (tuple(f"{p}.weight" for p in QKV_PROJ), "attn.qkv.weight", QKV),
    (tuple(f"{p}.bias" for p in QKV_PROJ), "attn.qkv.bias", QKV),
    *_pair("self_attn.out_proj", "attn.proj"),
    *_pair("layer_norm1", "norm1"),
    *_pair("layer_norm2", "norm2"),
    *_pair("mlp.fc1", "mlp.fc1"),
    *_pair("mlp.fc2", "mlp.fc2"),
]
TRUNK = [
    *_pair("vision_model.embeddings.patch_embedding", "patch_embed.proj"),
    ("vision_model.embeddings.position_embedding.weight", "pos_embed", BATCHED),
    *_pair("vision_model.post_layernorm", "norm"),
    ("vision_model.head.probe", "attn_pool.latent", SAME),
    ("vision_model.head.attention.in_proj_weight", ("attn_pool.q.weight", "attn_pool.kv.weight"), LATENT_Q_KV),
    ("vision_model.head.attention.in_proj_bias", ("attn_pool.q.bias", "attn_pool.kv.bias"), LATENT_Q_KV),
    *_pair("vision_model.head.attention.out_proj", "attn_pool.proj"),
    *_pair("vision_model.head.layernorm", "attn_pool.norm"),
    *_pair("vision_model.head.mlp.fc1", "attn_pool.mlp.fc1"),
    *_pair("vision_model.head.mlp.fc2", "attn_pool.mlp.fc2"),
]
# The text tower: open_clip's TextTransformer, with a biased nn.Linear projection (stored like HF's head).
TEXT = [
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", SAME),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", SAME),
    *_pair("text_model.final_layer_norm", "ln_final"),
    *_pair("text_model.head", "text_projection"),
]
TRUNK_PREFIX = "visual.trunk."


def _names(value) -> tuple[str, ...]:
    return value if isinstance(value, tuple) else (value,)


def rules(vision_layers: int, text_layers: int, *, text_prefix: str = "", logit_scale_shape: Shape = ()) -> list[Rule]:
    """The concrete table for a model with these layer counts (`text_prefix` "text." for CustomTextCLIP)."""
    def rows(table, hf_prefix: str, oc_prefix: str, regroup_of=lambda t: t) -> list[Rule]:
        return [Rule(tuple(hf_prefix + n for n in _names(hf)), tuple(oc_prefix + n for n in _names(oc)), regroup_of(t))
                for hf, oc, t in table]

    out = rows(TRUNK, "", TRUNK_PREFIX) + rows(TEXT, "", text_prefix)
    for i in range(vision_layers):
        out += rows(TRUNK_LAYER, f"vision_model.encoder.layers.{i}.", f"{TRUNK_PREFIX}blocks.{i}.")
    for i in range(text_layers):  # open_clip's own blocks: the CLIP table's layer rows
        out += rows(LAYER_TABLE, f"text_model.encoder.layers.{i}.", f"{text_prefix}transformer.resblocks.{i}.", _single)
    out += [Rule(("logit_scale",), ("logit_scale",), scalar(logit_scale_shape)),
            Rule(("logit_bias",), ("logit_bias",), scalar(logit_scale_shape))]
    return out


def open_clip_shapes(table: list[Rule], hf_shapes: dict[str, Shape]) -> dict[str, Shape]:
    out = {}
    for rule in table:
        out.update(zip(rule.open_clip, rule.regroup.open_clip_shapes(tuple(hf_shapes[n] for n in rule.hf))))
    return out


def _move(parts: list[Tensor], names: tuple[str, ...], targets: tuple[str, ...], fn) -> dict[str, Tensor]:
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
        raise ConvertError(f"{', '.join(names)} have different dtypes ({', '.join(sorted(dtypes))}); "
                           f"they are stored together as {', '.join(targets)}")
    arrays = fn(tuple(p.array for p in parts))
    return {name: parts[0].with_array(array) for name, array in zip(targets, arrays)}


def open_clip_to_hf(tensors: dict[str, Tensor], table: list[Rule]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for rule in table:
        out.update(_move([tensors[n] for n in rule.open_clip], rule.open_clip, rule.hf, rule.regroup.to_hf))
    return out


def hf_to_open_clip(tensors: dict[str, Tensor], table: list[Rule]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for rule in table:
        out.update(_move([tensors[n] for n in rule.hf], rule.hf, rule.open_clip, rule.regroup.to_open_clip))
    return out
