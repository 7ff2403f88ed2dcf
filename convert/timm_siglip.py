"""The timm vision trunks of open_clip's SigLIP models, as `transformers.SiglipVisionConfig` fields.

open_clip builds a SigLIP image tower as `timm.create_model(vision_cfg.timm_model_name,
num_classes=0, global_pool=vision_cfg.timm_pool)` (`open_clip/timm_model.py`, `TimmModel`), so the
architecture is not in the open_clip config: it is the named timm model's. The names open_clip's
own SigLIP configs use are in `KNOWN_TRUNKS`, so converting them needs neither timm nor torch (a
test holds the table to timm). Any other name is read from timm itself, lazily, by building the
model on torch's "meta" device (no memory, no weights) and checking, part by part, that it is
the computation `transformers.SiglipVisionTransformer` performs:

    patches (biased conv) + learned position embedding (no class or register tokens, fixed size)
    -> pre-norm blocks (fused-qkv attention with biases, GELU MLP, no layer scale, no qk-norm)
    -> final LayerNorm -> attention pooling with one latent query (`AttentionPoolLatent`,
       timm's 'map' pool = SiglipMultiheadAttentionPoolingHead) -> no classifier head.

Anything else is a ConfigError naming the timm part and why Hugging Face's model cannot compute it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlx_clip.errors import ConfigError

SIGLIP_POOL = "map"  # timm's attention pooling with a latent query
TIMM_LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm (partial(LayerNorm, eps=1e-6))


@dataclass(frozen=True)
class TimmTrunk:
    """What the tensors and the computation of a SigLIP ViT trunk depend on."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    hidden_act: str  # transformers' name: "gelu" (erf) or "gelu_pytorch_tanh"
    layer_norm_eps: float = TIMM_LAYER_NORM_EPS

    def vision_config(self) -> dict[str, Any]:
        """The `SiglipVisionConfig` fields (3 input channels, as timm builds these models)."""
        return {**asdict(self), "num_channels": 3}

    @classmethod
    def of(cls, vision) -> "TimmTrunk":
        """The trunk a `SiglipVisionConfig` describes."""
        return cls(**{k: getattr(vision, k) for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        return (f"width {self.hidden_size} / {self.num_hidden_layers} layers / {self.num_attention_heads} heads / "
                f"MLP {self.intermediate_size} / patch {self.patch_size} / {self.image_size} px / "
                f"{self.hidden_act} / LayerNorm eps {self.layer_norm_eps:g}")


def _family(width: int, layers: int, heads: int, mlp: int, patch: int, act: str, sizes: tuple[int, ...],
            prefix: str) -> dict[str, TimmTrunk]:
    return {f"{prefix}_{size}": TimmTrunk(width, layers, heads, mlp, patch, size, act) for size in sizes}


_GELU, _TANH = "gelu", "gelu_pytorch_tanh"  # timm's default nn.GELU; act_layer='gelu_tanh'
# timm's `vision_transformer.py` entrypoints (model_args) of the trunks open_clip's SigLIP and
# SigLIP 2 configs name; MLP width = int(width * mlp_ratio) (so400m: mlp_ratio 3.7362 -> 4304).
# Order matters for the reverse lookup: the first trunk with a given architecture wins.
KNOWN_TRUNKS: dict[str, TimmTrunk] = {
    **_family(768, 12, 12, 3072, 16, _GELU, (224, 256, 384, 512), "vit_base_patch16_siglip"),
    **_family(768, 12, 12, 3072, 32, _TANH, (256,), "vit_base_patch32_siglip"),
    **_family(1024, 24, 16, 4096, 16, _GELU, (256, 384), "vit_large_patch16_siglip"),
    **_family(1024, 24, 16, 4096, 16, _TANH, (512,), "vit_large_patch16_siglip"),
    **_family(1152, 27, 16, 4304, 14, _GELU, (224, 378, 384), "vit_so400m_patch14_siglip"),
    **_family(1152, 27, 16, 4304, 16, _TANH, (256, 384, 512), "vit_so400m_patch16_siglip"),
    **_family(1536, 40, 16, 6144, 16, _TANH, (256, 384), "vit_giantopt_patch16_siglip"),
}


def trunk_of(name: str, where: str) -> TimmTrunk:
    """The architecture of the timm model `name`, from the table or else from timm; `where` names
    the config field in messages."""
    if name in KNOWN_TRUNKS:
        return KNOWN_TRUNKS[name]
    return read_timm_trunk(name, where)


def timm_name_for(trunk: TimmTrunk) -> str | None:
    """The first known timm SigLIP trunk with this architecture, or None."""
    return next((name for name, known in KNOWN_TRUNKS.items() if known == trunk), None)


def read_timm_trunk(name: str, where: str) -> TimmTrunk:
    """Build timm's `name` on the meta device as open_clip does and read its architecture, or a
    ConfigError saying which part SiglipModel cannot compute."""
    known = ", ".join(KNOWN_TRUNKS)
    try:
        import timm  # lazily: only for names outside the table (timm brings torch)
    except ImportError:
        raise ConfigError(f"{where}: {name!r} is not one of the timm SigLIP trunks this converter knows "
                          f"({known}); reading another timm model's architecture needs timm installed "
                          "(pip install timm)") from None
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, global_pool=SIGLIP_POOL, device="meta")
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"{where}: timm has no model named {name!r} (SigLIP trunks: {known})") from None
        raise _unbuildable(where, name, err) from None
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        raise _unbuildable(where, name, err) from None
    return _check_trunk(model, f"{where}: timm model {name!r}")


def _unbuildable(where: str, name: str, err: Exception) -> ConfigError:
    return ConfigError(f"{where}: timm cannot build {name!r} with attention pooling, as open_clip's SigLIP does "
                       f"(global_pool='map': {err or type(err).__name__}); SiglipModel needs a ViT trunk")


def _kind(module: Any) -> str:
    return type(module).__name__


def _activation(mlp: Any) -> str | None:
    act = mlp.act
    if _kind(act) == "GELU":  # torch's nn.GELU (approximate='none'|'tanh') or timm's exact GELU
        return _TANH if getattr(act, "approximate", "none") == "tanh" else _GELU
    return _TANH if _kind(act) == "GELUTanh" else None


def _layer_norm_eps(norm: Any) -> float | None:
    """eps of an affine LayerNorm with bias (torch's or timm's subclass), else None."""
    if _kind(norm) != "LayerNorm" or not getattr(norm, "elementwise_affine", False) or norm.bias is None:
        return None
    return float(norm.eps)


def _check_trunk(model: Any, who: str) -> TimmTrunk:
    from timm.layers import Attention, AttentionPoolLatent, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise ConfigError(f"{who} {why}, which transformers' SiglipModel does not compute")

    need(type(model) is VisionTransformer, f"is built by timm's {_kind(model)} class, not its VisionTransformer")
    need(model.cls_token is None, "has a class token (class_token=True)")
    need(model.reg_token is None, f"has {model.num_reg_tokens} register tokens (reg_tokens)")
    need(model.pos_embed is not None, "has no learned position embedding (pos_embed)")
    need(not model.dynamic_img_size, "resamples its position embedding per input (dynamic_img_size=True)")
    embed = model.patch_embed
    need(type(embed) is PatchEmbed and _kind(embed.proj) == "Conv2d" and embed.proj.bias is not None,
         "has a patch embedding other than a biased convolution (embed_layer / pre_norm)")
    need(_kind(embed.norm) == "Identity", "normalises its patch embedding (embed_norm_layer)")
    need(not embed.dynamic_img_pad, "pads images to whole patches (dynamic_img_pad=True)")
    need(embed.proj.in_channels == 3, f"takes {embed.proj.in_channels} input channels (in_chans)")
    need(_kind(model.norm_pre) == "Identity", "normalises before the blocks (pre_norm=True)")
    need(_kind(model.fc_norm) == "Identity", "normalises after pooling (fc_norm)")
    need(_kind(model.head) == "Identity", "has a classifier head")
    need(model.global_pool == SIGLIP_POOL and type(model.attn_pool) is AttentionPoolLatent,
         f"pools with {model.global_pool!r}, not attention pooling ('map')")
    need(len(model.blocks) > 0 and all(type(b) is Block for b in model.blocks),
         "has no blocks, or blocks other than timm's pre-norm Block (block_fn)")
    first = model.blocks[0]
    need(type(first.attn) is Attention and type(first.mlp) is Mlp and _kind(first.mlp.fc1) == "Linear",
         "has another attention or MLP (attn_layer, mlp_layer)")
    width, heads, mlp_width = model.embed_dim, first.attn.num_heads, first.mlp.fc1.out_features
    eps = _layer_norm_eps(model.norm)
    need(eps is not None, "has no final LayerNorm (final_norm=False, or another norm_layer)")
    act = _activation(first.mlp)
    need(act is not None, "has an MLP activation other than GELU (act_layer)")

    def check_mlp(mlp: Any, where: str) -> None:
        need(type(mlp) is Mlp, f"has a {_kind(mlp)} MLP in {where} (mlp_layer)")
        need(_kind(mlp.fc1) == "Linear" and mlp.fc1.bias is not None and mlp.fc2.bias is not None,
             f"has an MLP without biases in {where} (proj_bias=False)")
        need(_kind(mlp.norm) == "Identity", f"normalises inside the MLP in {where} (scale_mlp_norm)")
        need(mlp.fc1.out_features == mlp_width, f"has MLP widths that differ between blocks ({where})")
        need(_activation(mlp) == act, f"has different activations in {where} (act_layer)")

    for i, block in enumerate(model.blocks):
        where = f"block {i}"
        attn = block.attn
        need(type(attn) is Attention and attn.num_heads == heads and attn.attn_dim == width,
             f"has a {_kind(attn)} attention of another shape in {where} (attn_layer)")
        need(attn.qkv.bias is not None and attn.proj.bias is not None, f"has attention without biases in {where}")
        need(_kind(attn.q_norm) == "Identity" and _kind(attn.k_norm) == "Identity",
             f"normalises q and k in {where} (qk_norm)")
        need(_kind(attn.norm) == "Identity", f"normalises the attention output in {where} (scale_attn_norm)")
        need(getattr(attn, "gate", None) is None, f"gates the attention output in {where}")
        need(_kind(block.ls1) == "Identity" and _kind(block.ls2) == "Identity",
             f"has layer scale in {where} (init_values)")
        need(_layer_norm_eps(block.norm1) == eps and _layer_norm_eps(block.norm2) == eps,
             f"has norms other than LayerNorm(eps={eps:g}) in {where}")
        check_mlp(block.mlp, where)
    pool = model.attn_pool
    need(pool.latent_len == 1 and pool.pool == "token" and pool.pos_embed is None,
         "pools with several latents or its own position embedding (AttentionPoolLatent)")
    need(pool.latent_dim == width and pool.num_heads == heads and _kind(pool.q) == "Linear",
         "has an attention pool of another width or head count")
    need(pool.q.bias is not None and pool.kv.bias is not None and _kind(pool.proj) == "Linear"
         and pool.proj.bias is not None, "has an attention pool without biases")
    need(_kind(pool.q_norm) == "Identity" and _kind(pool.k_norm) == "Identity", "normalises q and k in the pool")
    need(_layer_norm_eps(pool.norm) == eps, f"has a pool norm other than LayerNorm(eps={eps:g})")
    need(pool.mlp is not None, "has an attention pool without its MLP")
    check_mlp(pool.mlp, "the attention pool")
    patch, size = embed.patch_size, embed.img_size
    need(patch[0] == patch[1] and size[0] == size[1], f"has non-square patches or images ({patch}, {size})")
    return TimmTrunk(width, len(model.blocks), heads, mlp_width, patch[0], size[0], act, eps)
