"""Conversion between MLX, Hugging Face and open_clip checkpoints, held to transformers and open_clip.

References we did not write: `transformers.CLIPModel` (random-init, `save_pretrained`,
`from_pretrained`), `open_clip.model.CLIP` / `open_clip.create_model("local-dir:...")`, the
`safetensors` library's readers, and torch's float32 -> bfloat16 / float16 rounding.
Tolerances: float32 embeddings 1e-5 relative; bit-exact (same bytes) for every round trip.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import json
import shutil

import numpy as np
import pytest
import torch

from mlx_clip.convert import detect_format, read_checkpoint, write_checkpoint
from mlx_clip.convert.dtypes import bf16_bits_to_float32, float32_to_bf16_bits
from mlx_clip.convert.shapes import expected_shapes
from mlx_clip.model.config import CLIPConfig
from mlx_clip.conversion import convert
from mlx_clip.errors import ConvertError
from tests.helpers import (assert_same_bytes, hf_features, open_clip_features, perturb, random_pixels, random_tokens,
                           rel_err, save_hf, tensors_of, tiny_hf_clip)

FP32_REL = 1e-5
OC_VOCAB, OC_CONTEXT = 512, 16


# ---------------------------------------------------------------- sources

@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_source(request, tmp_path_factory):
    model = perturb(tiny_hf_clip(seed=1, hidden_act=request.param), seed=2)
    folder = save_hf(model, tmp_path_factory.mktemp(f"hf-{request.param}") / "src")
    return model, folder


OPEN_CLIP_VARIANTS = {
    "quick_gelu": dict(quick_gelu=True),
    # What SigLIP-style open_clip models write: a CustomTextCLIP (`text.` names), a (1,)-shaped
    # logit scale and a logit bias; plus the causal-mask buffer that older dumps saved.
    "custom_text+bias": dict(quick_gelu=False, custom_text=True, init_logit_bias=-10.0,
                             nonscalar_logit_scale=True, attn_mask=True),
}


def open_clip_model_cfg(quick_gelu: bool, **extra) -> dict:
    return dict(embed_dim=16, quick_gelu=quick_gelu,
                vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                text_cfg=dict(context_length=OC_CONTEXT, vocab_size=OC_VOCAB, width=32, heads=2, layers=2),
                **extra)


@pytest.fixture(scope="module", params=list(OPEN_CLIP_VARIANTS))
def oc_source(request, tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    options = dict(OPEN_CLIP_VARIANTS[request.param])
    keep_mask = options.pop("attn_mask", False)
    model_cfg = open_clip_model_cfg(**options)
    torch.manual_seed(3)
    build = open_clip.model.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.model.CLIP
    model = perturb(build(**{k: v for k, v in model_cfg.items() if k != "custom_text"}), seed=4)
    folder = tmp_path_factory.mktemp(f"oc-{request.param}") / "src"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if keep_mask:
        prefix = "text." if model_cfg.get("custom_text") else ""
        text = model.text if model_cfg.get("custom_text") else model
        state[f"{prefix}attn_mask"] = text.attn_mask.clone()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return model, folder


def oc_tokens(rng):
    # open_clip's default 'argmax' pooling: the EOT is the row's largest id.
    return random_tokens(rng, 3, vocab=OC_VOCAB, length=OC_CONTEXT, eot=OC_VOCAB - 1, sot=OC_VOCAB - 2)


# ---------------------------------------------------------------- names and shapes

def test_expected_shapes_equal_transformers_state_dict(hf_source):
    model, folder = hf_source
    config = CLIPConfig.from_file(folder / "config.json")
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(config) == reference


def test_detect_format_from_files_and_metadata(hf_source, oc_source, tmp_path):
    _, hf = hf_source
    _, oc = oc_source
    mlx = convert(hf, tmp_path / "mlx", to="mlx", verify=False)
    assert (detect_format(hf), detect_format(mlx), detect_format(oc)) == ("hf", "mlx", "open_clip")


# ---------------------------------------------------------------- exact round trips

def test_hf_mlx_hf_round_trip_is_bit_identical(hf_source, tmp_path):
    import transformers
    from safetensors import safe_open

    model, src = hf_source
    mlx = convert(src, tmp_path / "mlx", to="mlx")  # verified: torch source vs MLX engine
    back = convert(mlx, tmp_path / "hf", to="hf")
    with safe_open(str(mlx / "model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "mlx"
        mlx_patch = f.get_tensor("vision_model.embeddings.patch_embedding.weight")
    src_tensors = tensors_of(src / "model.safetensors")
    # MLX's Conv2d is channels-last: (out, kh, kw, in).
    np.testing.assert_array_equal(
        mlx_patch, src_tensors["vision_model.embeddings.patch_embedding.weight"].permute(0, 2, 3, 1).numpy())
    assert_same_bytes(tensors_of(back / "model.safetensors"), src_tensors)
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    reloaded = transformers.CLIPModel.from_pretrained(back)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_open_clip_hf_open_clip_round_trip_is_bit_identical(oc_source, tmp_path):
    _, src = oc_source
    hf = convert(src, tmp_path / "hf", to="hf")
    back = convert(hf, tmp_path / "oc", to="open_clip")
    original = tensors_of(src / "open_clip_model.safetensors")
    for buffer in ("attn_mask", "text.attn_mask"):  # recomputed by open_clip, never converted
        original.pop(buffer, None)
    assert_same_bytes(tensors_of(back / "open_clip_model.safetensors"), original)
    assert (json.loads((back / "open_clip_config.json").read_text())
            == json.loads((src / "open_clip_config.json").read_text()))


def test_bfloat16_cast_rounds_like_torch_and_round_trips_bit_exact(hf_source, tmp_path):
    _, src = hf_source
    bf16 = convert(src, tmp_path / "bf16", to="hf", dtype="bfloat16")  # verified: cosine >= 0.99
    reference = {k: v.to(torch.bfloat16) for k, v in tensors_of(src / "model.safetensors").items()}
    stored = tensors_of(bf16 / "model.safetensors")
    assert_same_bytes(stored, reference)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    # bf16 through every format and back: no rounding anywhere.
    mlx = convert(bf16, tmp_path / "mlx", to="mlx")
    oc = convert(mlx, tmp_path / "oc", to="open_clip", verify=False)
    back = convert(oc, tmp_path / "back", to="hf", verify=False)
    assert_same_bytes(tensors_of(back / "model.safetensors"), stored)
    # ... and the engines read bf16 widened exactly to float32.
    checkpoint = read_checkpoint(mlx)
    for name, value in checkpoint.tensors.items():
        assert value.dtype == np.float32 and checkpoint.dtypes[name] == "BF16"
        np.testing.assert_array_equal(value, stored[name].float().numpy())


def test_float16_cast_matches_torch(hf_source, tmp_path):
    _, src = hf_source
    out = convert(src, tmp_path / "fp16", to="mlx", dtype="float16")
    back = convert(out, tmp_path / "hf", to="hf", verify=False)
    reference = {k: v.to(torch.float16) for k, v in tensors_of(src / "model.safetensors").items()}
    assert_same_bytes(tensors_of(back / "model.safetensors"), reference)


def test_bf16_rounding_matches_torch_on_edge_values():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, size=20000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.finfo(np.float32).max, 1e-45, 1e-40,
                        1.00390625, 1.01171875, 3.3895314e38], np.float32)  # ties round to even
    values = np.concatenate([bits.view(np.float32), special])
    ours = float32_to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_bits_to_float32(ours[nan])).all()
    np.testing.assert_array_equal(bf16_bits_to_float32(theirs[~nan]),
                                  torch.from_numpy(theirs[~nan].view(np.int16)).view(torch.bfloat16).float().numpy())


# ---------------------------------------------------------------- semantics vs the reference libraries

def test_open_clip_to_hf_embeds_like_open_clip(oc_source, tmp_path):
    import transformers

    model, src = oc_source
    out = convert(src, tmp_path / "hf", to="hf")
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    rng = np.random.default_rng(5)
    pixels, ids = random_pixels(rng, 3, 32), oc_tokens(rng)
    for ours, theirs in zip(hf_features(hf, pixels, ids), open_clip_features(model, pixels, ids)):
        assert rel_err(ours, theirs) <= FP32_REL
    assert float(hf.logit_scale.detach()) == float(model.logit_scale.detach().reshape(()))


HF_TO_OPEN_CLIP = {
    "quick_gelu": dict(hidden_act="quick_gelu"),
    "gelu": dict(hidden_act="gelu"),
    "tanh+eps": dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}


@pytest.mark.parametrize("variant", list(HF_TO_OPEN_CLIP))
def test_hf_to_open_clip_loads_in_open_clip_and_embeds_like_hf(variant, tmp_path):
    import open_clip
    from tests.helpers import TINY_TEXT, TINY_VISION, hf_clip

    options = HF_TO_OPEN_CLIP[variant]
    model = perturb(hf_clip(6, {**TINY_TEXT, **options}, {**TINY_VISION, **options}, projection_dim=16), seed=7)
    src = save_hf(model, tmp_path / "src")
    out = convert(src, tmp_path / "oc", to="open_clip")
    loaded = open_clip.create_model(f"local-dir:{out}").eval()  # open_clip's own loader, strict
    rng = np.random.default_rng(8)
    pixels, ids = random_pixels(rng, 3, 32), random_tokens(rng, 3)
    for ours, theirs in zip(open_clip_features(loaded, pixels, ids), hf_features(model, pixels, ids)):
        assert rel_err(ours, theirs) <= FP32_REL


def test_open_clip_to_mlx_embeds_like_open_clip(oc_source, tmp_path):
    from mlx_clip.api import load

    model, src = oc_source
    out = convert(src, tmp_path / "mlx", to="mlx")
    engine = load(out, backend="mlx")
    rng = np.random.default_rng(9)
    pixels, ids = random_pixels(rng, 3, 32), oc_tokens(rng)
    image, text = open_clip_features(model, pixels, ids)
    assert rel_err(engine.encode_images(pixels), image) <= FP32_REL
    assert rel_err(engine.encode_texts(ids), text) <= FP32_REL


def test_mlx_engine_checkpoint_converts_to_hf_that_embeds_alike(tmp_path):
    import transformers
    from mlx_clip.model.config import tiny_config
    from mlx_clip.mlx_backend.backend import MLXBackend

    engine = MLXBackend.random(tiny_config(), seed=10)
    engine.save(tmp_path / "mlx")  # written by MLX's own safetensors writer
    assert detect_format(tmp_path / "mlx") == "mlx"
    out = convert(tmp_path / "mlx", tmp_path / "hf", to="hf")
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    rng = np.random.default_rng(11)
    pixels, ids = random_pixels(rng, 3, 32), random_tokens(rng, 3)
    image, text = hf_features(hf, pixels, ids)
    assert rel_err(engine.encode_images(pixels), image) <= FP32_REL
    assert rel_err(engine.encode_texts(ids), text) <= FP32_REL


# ---------------------------------------------------------------- folders

def test_write_checkpoint_from_numpy_loads_in_transformers(hf_source, tmp_path):
    import transformers

    model, src = hf_source
    checkpoint = read_checkpoint(src)
    write_checkpoint(tmp_path / "hf", checkpoint.config, checkpoint.tensors, to="hf")
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "hf")
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    write_checkpoint(tmp_path / "mlx", checkpoint.config, checkpoint.tensors, to="mlx", dtype="bfloat16")
    bf16 = read_checkpoint(tmp_path / "mlx")
    for name, value in model.state_dict().items():
        assert bf16.dtypes[name] == "BF16"
        np.testing.assert_array_equal(bf16.tensors[name], value.to(torch.bfloat16).float().numpy())


def test_sharded_and_single_file_read_the_same(hf_source, tmp_path):
    model, src = hf_source
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single, sharded = read_checkpoint(src), read_checkpoint(tmp_path / "sharded")
    assert sharded.source_format == "hf" and sorted(single.tensors) == sorted(sharded.tensors)
    for name, value in single.tensors.items():
        np.testing.assert_array_equal(sharded.tensors[name], value)


def test_side_files_copied_and_destination_rules(hf_source, tmp_path):
    _, hf = hf_source
    src = tmp_path / "src"
    shutil.copytree(hf, src)
    side = {"preprocessor_config.json": json.dumps({"image_mean": [0.4, 0.4, 0.4], "image_std": [0.3, 0.3, 0.3]}),
            "tokenizer_config.json": "{}", "special_tokens_map.json": "{}"}
    for name, text in side.items():
        (src / name).write_text(text)
    out = convert(src, tmp_path / "mlx", to="mlx", verify=False)
    for name, text in side.items():
        assert (out / name).read_text() == text
    oc = convert(src, tmp_path / "oc", to="open_clip", verify=False)
    assert json.loads((oc / "open_clip_config.json").read_text())["preprocess_cfg"] == {
        "mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]}
    with pytest.raises(ConvertError, match="not empty"):
        convert(src, out, to="hf", verify=False)
    convert(src, out, to="hf", verify=False, overwrite=True)
    assert detect_format(out) == "hf"
    with pytest.raises(ConvertError, match="--to must be one of"):
        convert(src, tmp_path / "x", to="onnx")
    with pytest.raises(ConvertError, match="dtype must be one of"):
        convert(src, tmp_path / "x", to="hf", dtype="int8")


def test_failed_verification_leaves_destination_untouched(hf_source, tmp_path, monkeypatch):
    import mlx_clip.convert.converter as converter

    _, src = hf_source
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    real_write = converter.write_stored

    def corrupting_write(folder, to, config, tensors, *args, **kwargs):
        name = "visual_projection.weight"
        # Reordered rows permute the embedding's coordinates: a change normalisation cannot hide.
        tensors = {**tensors, name: tensors[name].with_array(tensors[name].array[::-1].copy())}
        return real_write(folder, to, config, tensors, *args, **kwargs)

    monkeypatch.setattr(converter, "write_stored", corrupting_write)
    with pytest.raises(ConvertError, match="verification failed: image embeddings differ"):
        convert(src, dst, to="hf", overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no staging folder left behind
