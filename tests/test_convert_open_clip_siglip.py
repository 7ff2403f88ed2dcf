"""open_clip's SigLIP (a timm ViT trunk beside open_clip's text tower) <-> Hugging Face and MLX.

References we did not write: open_clip (`CustomTextCLIP` / `CLIP` with a `TimmModel` image tower,
`encode_image` / `encode_text`, `create_model("local-dir:...")` with its strict load), timm (the
trunks, built from their names; `register_model` for the small ones below),
`transformers.SiglipModel`, and the `safetensors` library's reader.

Tolerances: float32 embeddings (unnormalised) 1e-5 relative, in L2 and in the largest |difference|
over the largest |entry|. Both sides hold the same float32 bits, so only the order of float32 sums
differs (timm's fused attention and open_clip's nn.MultiheadAttention against transformers' sdpa,
or MLX's CPU matmuls): about 1e-7 per operation, 1e-6 after 12 blocks. A misplaced, untransposed
or wrongly split tensor moves the result by far more than 1e-2. Round trips are bit-exact.

One model is open_clip's real `ViT-B-16-SigLIP` config (the case users have), built once; small
trunks registered with timm cover other layouts and sizes, the MLX engine, the CLI and the
refusals in milliseconds.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from mlx_clip.convert.open_clip_siglip import siglip_config_from_open_clip
from mlx_clip.convert.timm_siglip import KNOWN_TRUNKS, TimmTrunk, read_timm_trunk
from mlx_clip.conversion import convert
from mlx_clip.errors import CheckpointError, ConfigError, ConvertError
from tests.helpers import assert_same_bytes, hf_features, open_clip_features, perturb, rel_err, tensors_of

FP32 = 1e-5
B16 = "ViT-B-16-SigLIP"
# open_clip's SigLIP preprocess_cfg (open_clip/pretrained.py `_slpcfg`).
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}
TINY_VOCAB, TINY_CONTEXT = 1024, 16

# Small timm trunks: timm's own VisionTransformer, SigLIP-shaped (no class token, 'map' pool)
# unless the overrides say otherwise. Width 64, 2 blocks, 2 heads, MLP ratio 3, 8 px patches.
TINY_TRUNK = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=3.0, class_token=False,
                  global_pool="map", act_layer="gelu_tanh")
TINY_TRUNKS = {
    "mlxclip_test_siglip": {},
    "mlxclip_test_reg_tokens": dict(reg_tokens=2),
    "mlxclip_test_layer_scale": dict(init_values=1e-5),
    "mlxclip_test_qk_norm": dict(qk_norm=True),
    "mlxclip_test_pre_norm": dict(pre_norm=True),
}


def _register(name: str, overrides: dict) -> None:
    def entrypoint(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        return VisionTransformer(**{**TINY_TRUNK, **overrides, **kwargs})

    entrypoint.__name__ = name
    register_model(entrypoint)


for _name, _overrides in TINY_TRUNKS.items():
    if not timm.is_model(_name):
        _register(_name, _overrides)


def tiny_model_cfg(layout: str = "custom_text") -> dict:
    """A small open_clip SigLIP. "custom_text": as open_clip's SigLIP configs (CustomTextCLIP, tanh
    GELU, eps 1e-6, MLP ratio 3.5); "clip": the `CLIP` class (text tensors at the top level), a
    (1,)-shaped logit scale and QuickGELU in the text tower (timm's trunk ignores the flag)."""
    text = dict(context_length=TINY_CONTEXT, vocab_size=TINY_VOCAB, width=32, heads=2, layers=2,
                hf_tokenizer_name="timm/ViT-B-16-SigLIP", no_causal_mask=True, proj_bias=True, pool_type="last")
    cfg = dict(embed_dim=64, init_logit_bias=-10.0,
               vision_cfg=dict(image_size=32, timm_model_name="mlxclip_test_siglip", timm_model_pretrained=False,
                               timm_pool="map", timm_proj="none"), text_cfg=text)
    if layout == "custom_text":
        text.update(mlp_ratio=3.5, norm_kwargs={"eps": 1e-6}, act_kwargs={"approximate": "tanh"})
        return {"custom_text": True, **cfg}
    return {**cfg, "quick_gelu": True, "nonscalar_logit_scale": True}


def siglip_ids(rng, batch: int, vocab: int, length: int) -> np.ndarray:
    """Row 0 fills the context; the others end with `</s>` (1) and are padded with it, as open_clip's
    SigLIP tokenizer pads: the towers pool the last position, so padding is input."""
    ids = rng.integers(2, vocab, size=(batch, length))
    for row in range(1, batch):
        end = int(rng.integers(1, length - 1))
        ids[row, end:] = 1
    return ids


def normalized(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_close(ours, theirs):
    """Relative L2 error, and the largest |difference| relative to the largest |entry|, <= 1e-5."""
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= FP32
    assert float(np.max(np.abs(ours - theirs))) <= FP32 * float(np.max(np.abs(theirs)))


def save_open_clip(model, folder: Path, model_cfg: dict, tokenizer: bool = False) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": SIGLIP_PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:  # a hub folder (timm/ViT-*-SigLIP) has the tokenizer its text_cfg names beside the weights
        from mlx_clip.model.builtin_tokenizer import write_demo_tokenizer

        write_demo_tokenizer(folder, TINY_VOCAB, TINY_CONTEXT)
    return folder


def build_source(name: str, root: Path, *, tokenizer: bool = True) -> SimpleNamespace:
    """An open_clip SigLIP folder, the batch it is compared on and open_clip's embeddings of it."""
    import open_clip

    if name == B16:
        model_cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / f"{B16}.json").read_text())
        size, vocab, context, batch = 224, 32000, 64, 2
    else:
        model_cfg = tiny_model_cfg(name)
        size, vocab, context, batch = 32, TINY_VOCAB, TINY_CONTEXT, 3
    torch.manual_seed(0)
    build = open_clip.model.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.model.CLIP
    model = perturb(build(**{k: v for k, v in model_cfg.items() if k != "custom_text"}), seed=1)
    src = save_open_clip(model, root / "src", model_cfg, tokenizer=tokenizer and name != B16)
    rng = np.random.default_rng(2)
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    ids = siglip_ids(rng, batch, vocab, context)
    image, text = open_clip_features(model, pixels, ids, normalize=False)
    return SimpleNamespace(name=name, model=None if name == B16 else model, src=src, pixels=pixels, ids=ids,
                           image=image, text=text, logit_scale=model.logit_scale.detach().reshape(-1).clone(),
                           logit_bias=model.logit_bias.detach().reshape(-1).clone())


@pytest.fixture(scope="module", params=[B16, "custom_text", "clip"])
def source(request, tmp_path_factory):
    return build_source(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """`source` converted to Hugging Face. ViT-B-16 is held to open_clip by the tests, not by the
    engines' own check (two more 200M-parameter models); the small ones go through it."""
    out = convert(source.src, tmp_path_factory.mktemp("hf") / "hf", to="hf", verify=source.name != B16)
    return out


# ---------------------------------------------------------------- the timm table

def test_known_trunks_are_what_timm_builds():
    for name, trunk in KNOWN_TRUNKS.items():
        assert read_timm_trunk(name, "test") == trunk, name


# ---------------------------------------------------------------- open_clip -> HF / MLX

def test_open_clip_siglip_to_hf_embeds_like_open_clip(source, converted):
    import transformers

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "siglip" and config["open_clip_config"]["model_cfg"]["vision_cfg"]
    hf = transformers.SiglipModel.from_pretrained(converted).eval()
    if source.name == B16:
        assert TimmTrunk.of(hf.config.vision_config) == KNOWN_TRUNKS["vit_base_patch16_siglip_224"]
    image, text = hf_features(hf, source.pixels, source.ids, normalize=False)
    assert_close(image, source.image)
    assert_close(text, source.text)
    assert torch.equal(hf.logit_scale.detach(), source.logit_scale)
    assert torch.equal(hf.logit_bias.detach(), source.logit_bias)
    processor = json.loads((converted / "preprocessor_config.json").read_text())
    size = source.pixels.shape[1]
    assert processor["image_processor_type"] == "SiglipImageProcessor"
    assert (processor["image_mean"], processor["image_std"], processor["size"], processor["resample"]) == (
        [0.5] * 3, [0.5] * 3, {"height": size, "width": size}, 3)


def test_open_clip_hf_open_clip_round_trip_is_bit_identical(source, converted, tmp_path):
    back = convert(converted, tmp_path / "oc", to="open_clip", verify=source.name != B16)
    assert_same_bytes(tensors_of(back / "open_clip_model.safetensors"),
                      tensors_of(source.src / "open_clip_model.safetensors"))
    assert (json.loads((back / "open_clip_config.json").read_text())
            == json.loads((source.src / "open_clip_config.json").read_text()))


@pytest.fixture(scope="module", params=["custom_text", "clip"])
def tiny(request, tmp_path_factory):
    return build_source(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


def test_open_clip_siglip_to_mlx_embeds_like_open_clip_and_back(tiny, tmp_path):
    from safetensors import safe_open

    from mlx_clip.api import load

    out = convert(tiny.src, tmp_path / "mlx", to="mlx")  # verified: torch reads the source, MLX the result
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "mlx"
    clip = load(out, backend="mlx")  # the MLX engine, with the tokenizer that travelled with the weights
    # The engines return L2-normalised embeddings.
    assert_close(clip.encode_images(tiny.pixels), normalized(tiny.image))
    assert_close(clip.encode_texts(tiny.ids), normalized(tiny.text))
    assert clip.encode_texts(["a red circle"]).shape == (1, 64)
    # The open_clip folder itself loads the same way: its tokenizer at its context length, a square resize.
    direct = load(tiny.src, backend="mlx")
    assert (direct.tokenizer.context_length, direct.crop, direct.mean) == (TINY_CONTEXT, False, (0.5, 0.5, 0.5))
    assert_close(direct.encode_images(tiny.pixels), normalized(tiny.image))
    back = convert(out, tmp_path / "oc", to="open_clip")
    assert_same_bytes(tensors_of(back / "open_clip_model.safetensors"),
                      tensors_of(tiny.src / "open_clip_model.safetensors"))


def test_bfloat16_through_hf_and_back_is_torchs_rounding(tiny, tmp_path):
    bf16 = convert(tiny.src, tmp_path / "hf", to="hf", dtype="bfloat16")  # verified: cosine >= 0.99
    back = convert(bf16, tmp_path / "oc", to="open_clip", verify=False)
    reference = {k: v.to(torch.bfloat16) for k, v in tensors_of(tiny.src / "open_clip_model.safetensors").items()}
    assert_same_bytes(tensors_of(back / "open_clip_model.safetensors"), reference)


# ---------------------------------------------------------------- HF -> open_clip

def test_hf_siglip_to_open_clip_loads_strictly_and_embeds_like_hf(tmp_path):
    """A transformers-made SigLIP whose image tower is timm's vit_base_patch32_siglip_256 (tanh GELU),
    with a text tower of its own shape."""
    import open_clip
    import transformers

    from mlx_clip.convert.writer import write_preprocessor_config

    torch.manual_seed(3)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TINY_CONTEXT, projection_size=768,
                         bos_token_id=None, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=256, patch_size=32))
    hf = perturb(transformers.SiglipModel._from_config(config, attn_implementation="sdpa"), seed=4)
    src = tmp_path / "hf"
    hf.save_pretrained(src, safe_serialization=True)
    write_preprocessor_config(src, 256, siglip=True)
    # Held to open_clip and transformers below rather than by the engines' check.
    out = convert(src, tmp_path / "oc", to="open_clip", verify=False)
    written = json.loads((out / "open_clip_config.json").read_text())
    assert written["model_cfg"]["vision_cfg"]["timm_model_name"] == "vit_base_patch32_siglip_256"
    assert written["model_cfg"]["text_cfg"]["act_kwargs"] == {"approximate": "tanh"}
    assert written["preprocess_cfg"] == SIGLIP_PREPROCESS
    loaded = open_clip.create_model(f"local-dir:{out}").eval()  # open_clip's own loader, strict
    rng = np.random.default_rng(5)
    pixels, ids = rng.standard_normal((2, 256, 256, 3)).astype(np.float32), siglip_ids(rng, 2, TINY_VOCAB, TINY_CONTEXT)
    for ours, theirs in zip(open_clip_features(loaded, pixels, ids, normalize=False), hf_features(hf, pixels, ids, normalize=False)):
        assert_close(ours, theirs)
    assert torch.equal(loaded.logit_scale.detach().reshape(1), hf.logit_scale.detach())
    assert torch.equal(loaded.logit_bias.detach().reshape(1), hf.logit_bias.detach())
    back = convert(out, tmp_path / "back", to="hf", verify=False)
    assert_same_bytes(tensors_of(back / "model.safetensors"), tensors_of(src / "model.safetensors"))


def test_hf_siglip_of_no_timm_shape_is_refused(tmp_path):
    import transformers

    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, projection_size=64, bos_token_id=None,
                         eos_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    transformers.SiglipModel._from_config(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConvertError, match=r"named timm model, and no timm SigLIP model has this one's architecture "
                                           r"\(width 64 / 2 layers / 2 heads / MLP 128 / patch 8 / 32 px"):
        convert(tmp_path / "hf", tmp_path / "oc", to="open_clip")
    assert not (tmp_path / "oc").exists()


# ---------------------------------------------------------------- CLI, tokenizer

def test_cli_converts_an_open_clip_siglip_folder(tmp_path):
    from click.testing import CliRunner

    from mlx_clip.cli import main

    src = build_source("custom_text", tmp_path).src
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "mlx"), "--to", "mlx"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "mlx").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]


def test_a_converted_folder_without_tokenizer_says_which_file_is_missing(tmp_path):
    from mlx_clip.api import load

    src = build_source("custom_text", tmp_path, tokenizer=False).src
    out = convert(src, tmp_path / "hf", to="hf")  # verified on token ids: no tokenizer needed
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: file not found; a SigLIP model folder needs its "
                                              r"tokenizer\.json \(open_clip reads this model's tokenizer from the hub "
                                              r"repository 'timm/ViT-B-16-SigLIP'"):
        load(out, backend="mlx")


# ---------------------------------------------------------------- refusals

def _edited(vision: dict | None = None, text: dict | None = None, **top) -> dict:
    cfg = tiny_model_cfg()
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    cfg.update(top)
    return {"model_cfg": cfg}


REFUSED = {
    # timm trunks SiglipModel cannot compute
    "CLIP-style pool": (dict(timm_model_name="vit_base_patch16_clip_224", timm_pool="token", image_size=224),
                        r"vision_cfg\.timm_pool='token' is not supported \(a Hugging Face SiglipModel needs 'map'\)"),
    "class token": (dict(timm_model_name="vit_base_patch16_clip_224", image_size=224),
                    r"timm model 'vit_base_patch16_clip_224' has a class token \(class_token=True\)"),
    "register tokens": (dict(timm_model_name="mlxclip_test_reg_tokens"), r"has 2 register tokens \(reg_tokens\)"),
    "layer scale": (dict(timm_model_name="mlxclip_test_layer_scale"), r"has layer scale in block 0 \(init_values\)"),
    "qk norm": (dict(timm_model_name="mlxclip_test_qk_norm"), r"normalises q and k in block 0 \(qk_norm\)"),
    "pre norm": (dict(timm_model_name="mlxclip_test_pre_norm"), r"biased convolution \(embed_layer / pre_norm\)"),
    "not a ViT": (dict(timm_model_name="resnet50"), r"timm cannot build 'resnet50' with attention pooling"),
    "unknown name": (dict(timm_model_name="no_such_trunk"), r"timm has no model named 'no_such_trunk'"),
    "projection": (dict(timm_proj="linear"), r"vision_cfg\.timm_proj='linear' is not supported"),
    "image size": (dict(image_size=64), r"vision_cfg\.image_size=64, but timm's mlxclip_test_siglip takes 32 px"),
}
REFUSED_TEXT = {
    "causal text": (dict(no_causal_mask=False), r"text_cfg\.no_causal_mask=False is not supported"),
    "argmax pool": (dict(pool_type="argmax"), r"text_cfg\.pool_type='argmax' is not supported"),
    "unbiased projection": (dict(proj_bias=False), r"text_cfg\.proj_bias=False is not supported"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_timm_trunks_siglip_cannot_compute_are_refused_naming_the_field(case):
    vision, message = REFUSED[case]
    with pytest.raises(ConfigError, match=message) as err:
        siglip_config_from_open_clip(_edited(vision=vision), "open_clip_config.json")
    assert str(err.value).startswith("open_clip_config.json: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("case", list(REFUSED_TEXT))
def test_text_towers_siglip_cannot_compute_are_refused_naming_the_field(case):
    text, message = REFUSED_TEXT[case]
    with pytest.raises(ConfigError, match=message):
        siglip_config_from_open_clip(_edited(text=text))


def test_top_level_fields_siglip_needs_are_checked():
    with pytest.raises(ConfigError, match=r"model_cfg\.embed_dim must equal the width of timm's mlxclip_test_siglip "
                                          r"\(64\).*got 32"):
        siglip_config_from_open_clip(_edited(embed_dim=32))
    with pytest.raises(ConfigError, match=r"model_cfg\.init_logit_bias is not set"):
        siglip_config_from_open_clip(_edited(init_logit_bias=None))


def test_cli_refusal_is_one_line_with_exit_code_2(tmp_path):
    from click.testing import CliRunner

    from mlx_clip.cli import main

    src = tmp_path / "oc"
    src.mkdir()
    (src / "open_clip_config.json").write_text(json.dumps(_edited(vision=REFUSED["class token"][0])))
    (src / "open_clip_model.safetensors").write_bytes(b"")  # the config is refused before the weights are read
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--to", "hf"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "class token (class_token=True)" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "out").exists()
