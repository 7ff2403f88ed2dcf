"""LoRA in both engines, held to transformers.CLIPModel, torch autograd and numpy.

Tolerances (float32, relative L2), each about 10x what was measured on this machine: forward MLX
vs torch <= 5e-6 (measured 4.5e-7); merged weights vs numpy float64 W + (alpha/r) B A <= 4e-7
(3.6e-8: one float32 rounding); merged vs unmerged forward and the merged model reloaded by
transformers <= 1e-5 (8.7e-7: the update is added to the weight instead of the activations, one
reassociation); loss MLX vs torch <= 1e-6 (0); gradients MLX vs torch <= 2e-5 (1.3e-6: the backward
pass doubles the depth of accumulated rounding); the compiled step vs the uncompiled one: loss <=
1e-6 (1.8e-7), gradients <= 1e-5 (1.5e-6). Exact where the maths is exact: B = 0 adds exactly zero,
and A is the same bytes in both engines.
"""

import math

import numpy as np
import pytest
import torch
import transformers

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_clip.convert.layout import mlx_to_torch, torch_to_mlx
from mlx_clip.mlx_backend import lora as mlx_lora
from mlx_clip.errors import ConfigError
from mlx_clip.mlx_backend.loss import clip_loss as mlx_clip_loss
from tests.helpers import hf_clip, random_pixels, random_tokens, rel_err
from tests.test_model_parity import mlx_from_hf
from mlx_clip.torch_backend import lora as torch_lora
from mlx_clip.torch_backend.loss import clip_loss as torch_clip_loss

# Towers of different widths and depths, so a count that mixed them up would be caught.
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")
VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
              image_size=32, patch_size=8, hidden_act="quick_gelu")
RANK, ALPHA = 4, 8.0


def reference(seed: int = 0):
    return hf_clip(seed, TEXT, VISION, projection_dim=24)


def pair(seed: int = 0):
    hf = reference(seed)
    return hf, mlx_from_hf(hf)


def batch(seed: int = 1, size: int = 4):
    rng = np.random.default_rng(seed)
    return random_tokens(rng, size), random_pixels(rng, size, VISION["image_size"])


def run_torch(model, tokens, pixels):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    return {k: getattr(out, k).numpy() for k in ("image_embeds", "text_embeds", "logits_per_image")}


def run_mlx(model, tokens, pixels):
    out = model(mx.array(tokens.astype(np.int32)), mx.array(pixels))
    return {k: np.array(out[k]) for k in ("image_embeds", "text_embeds", "logits_per_image")}


def expected_count(config, rank, targets, towers) -> int:
    """sum over adapted Linears of rank * (in + out), from the transformers config alone."""
    total = 0
    for tower in towers:
        cfg = config.text_config if tower == "text_model" else config.vision_config
        h, m = cfg.hidden_size, cfg.intermediate_size
        shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h),
                  "fc1": (h, m), "fc2": (m, h)}
        total += cfg.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets)
    return total


def randomize_lora(hf, mlx_model, seed: int = 7) -> None:
    """Random A and B (B != 0, so the update matters) set by name in torch, then the whole torch
    state dict loaded by name into MLX: the two engines' names must coincide for this to work."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith((".lora_a", ".lora_b")):
                param.copy_(torch.from_numpy(0.1 * rng.standard_normal(param.shape).astype(np.float32)))
    state = [(k, mx.array(torch_to_mlx(k, v.numpy()))) for k, v in hf.state_dict().items()]
    mlx_model.load_weights(state, strict=True)


CASES = [
    (RANK, mlx_lora.ALL_TARGETS, mlx_lora.ALL_TOWERS),
    (1, ("q_proj", "v_proj"), ("text_model",)),
    (3, ("fc1", "out_proj"), ("vision_model",)),
    (2, ("fc2",), ("vision_model", "text_model")),
]


@pytest.mark.parametrize("rank,targets,towers", CASES)
def test_trainable_count_and_names(rank, targets, towers):
    hf, model = pair()
    want = expected_count(hf.config, rank, targets, towers)
    got_mlx = mlx_lora.apply_lora(model, rank=rank, alpha=ALPHA, targets=targets, towers=towers)
    got_torch = torch_lora.apply_lora(hf, rank=rank, alpha=ALPHA, targets=targets, towers=towers)
    assert got_mlx == got_torch == want

    names = mlx_lora.lora_parameter_names(model)
    assert names == torch_lora.lora_parameter_names(hf)
    assert len(names) == 2 * sum(len(targets) * (TEXT if t == "text_model" else VISION)["num_hidden_layers"]
                                 for t in towers)
    assert sorted(k for k, _ in tree_flatten(model.trainable_parameters())) == sorted(names)
    assert sorted(n for n, p in hf.named_parameters() if p.requires_grad) == sorted(names)
    # Every tensor, frozen or not, has the same name and shape in both engines (exact resume by name).
    mlx_shapes = {k: tuple(mlx_to_torch(k, np.zeros(v.shape)).shape) for k, v in tree_flatten(model.parameters())}
    assert mlx_shapes == {k: tuple(v.shape) for k, v in hf.state_dict().items()}

    # The caller may unfreeze more; the wrapped base Linears stay frozen.
    model.unfreeze(keys=["logit_scale"], recurse=False)
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == set(names) | {"logit_scale"}


def test_init_is_identical_across_engines_and_leaves_the_model_unchanged():
    hf, model = pair()
    tokens, pixels = batch()
    before_mlx, before_torch = run_mlx(model, tokens, pixels), run_torch(hf, tokens, pixels)
    mlx_lora.apply_lora(model, rank=RANK, alpha=ALPHA, seed=3)
    torch_lora.apply_lora(hf, rank=RANK, alpha=ALPHA, seed=3)

    mlx_state = dict(tree_flatten(model.parameters()))
    torch_state = hf.state_dict()
    for name in mlx_lora.lora_parameter_names(model):
        a_mlx, a_torch = np.array(mlx_state[name]), torch_state[name].numpy()
        assert np.array_equal(a_mlx, a_torch), name
        if name.endswith("lora_b"):
            assert not a_mlx.any(), name
        else:
            # torch's kaiming_uniform_(a=sqrt(5)) bound, from torch's own gain: 1/sqrt(fan_in).
            fan_in = a_mlx.shape[1]
            bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
            assert 0.8 * bound < np.abs(a_mlx).max() <= bound + 1e-7, name
    a_names = [n for n in mlx_lora.lora_parameter_names(model) if n.endswith("lora_a")]
    assert len({np.array(mlx_state[n]).tobytes() for n in a_names}) == len(a_names)

    for after, before in ((run_mlx(model, tokens, pixels), before_mlx), (run_torch(hf, tokens, pixels), before_torch)):
        for key in before:
            assert np.array_equal(after[key], before[key]), key

    # A site's A depends on the seed and the site only, not on which other sites are adapted.
    other = mlx_from_hf(reference())
    mlx_lora.apply_lora(other, rank=RANK, alpha=ALPHA, targets=("fc2",), seed=3)
    site = "vision_model.encoder.layers.1.mlp.fc2.lora_a"
    assert np.array_equal(np.array(dict(tree_flatten(other.parameters()))[site]), np.array(mlx_state[site]))


def test_lora_forward_parity_and_merge():
    hf, model = pair()
    tokens, pixels = batch()
    base_out = run_torch(hf, tokens, pixels)
    plain = {k: v.numpy().astype(np.float64) for k, v in hf.state_dict().items()}
    torch_lora.apply_lora(hf, rank=RANK, alpha=ALPHA)
    mlx_lora.apply_lora(model, rank=RANK, alpha=ALPHA)
    randomize_lora(hf, model)

    lora_torch, lora_mlx = run_torch(hf, tokens, pixels), run_mlx(model, tokens, pixels)
    assert rel_err(lora_torch["logits_per_image"], base_out["logits_per_image"]) > 1e-3  # LoRA matters
    for key in lora_torch:
        assert rel_err(lora_mlx[key], lora_torch[key]) <= 5e-6, key

    lora_state = {k: v.numpy().astype(np.float64) for k, v in hf.state_dict().items()}
    torch_lora.merge_lora(hf)
    mlx_lora.merge_lora(model)
    merged_torch = {k: v.numpy() for k, v in hf.state_dict().items()}
    merged_mlx = {k: mlx_to_torch(k, np.array(v)) for k, v in tree_flatten(model.parameters())}
    assert set(merged_torch) == set(merged_mlx) == set(plain)
    assert not mlx_lora.lora_parameter_names(model) and not torch_lora.lora_parameter_names(hf)

    paths = {k[: -len(".lora_a")] for k in lora_state if k.endswith(".lora_a")}
    assert len(paths) == 6 * (TEXT["num_hidden_layers"] + VISION["num_hidden_layers"])
    for path in paths:
        a, b = lora_state[f"{path}.lora_a"], lora_state[f"{path}.lora_b"]
        want = plain[f"{path}.weight"] + (ALPHA / RANK) * b @ a
        assert rel_err(merged_torch[f"{path}.weight"], want) <= 4e-7, path
        assert rel_err(merged_mlx[f"{path}.weight"], want) <= 4e-7, path
        assert np.array_equal(merged_mlx[f"{path}.bias"], plain[f"{path}.bias"].astype(np.float32)), path
    for name in set(plain) - {f"{p}.weight" for p in paths}:
        assert np.array_equal(merged_torch[name], plain[name].astype(np.float32)), name

    merged_out_torch, merged_out_mlx = run_torch(hf, tokens, pixels), run_mlx(model, tokens, pixels)
    for key in lora_torch:
        assert rel_err(merged_out_torch[key], lora_torch[key]) <= 1e-5, key
        assert rel_err(merged_out_mlx[key], lora_mlx[key]) <= 1e-5, key


def test_merged_torch_model_loads_in_transformers(tmp_path):
    hf, model = pair()
    torch_lora.apply_lora(hf, rank=RANK, alpha=ALPHA, targets=("q_proj", "fc1"))
    mlx_lora.apply_lora(model, rank=RANK, alpha=ALPHA, targets=("q_proj", "fc1"))
    randomize_lora(hf, model)
    tokens, pixels = batch()
    lora_out = run_torch(hf, tokens, pixels)
    torch_lora.merge_lora(hf)
    hf.save_pretrained(tmp_path, safe_serialization=True)

    loaded, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True,
                                                          attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded_out = run_torch(loaded.eval(), tokens, pixels)
    for key in lora_out:
        assert rel_err(loaded_out[key], lora_out[key]) <= 1e-5, key


def test_gradients_reach_only_lora_and_match_torch():
    hf, model = pair(seed=5)
    torch_lora.apply_lora(hf, rank=RANK, alpha=ALPHA)
    mlx_lora.apply_lora(model, rank=RANK, alpha=ALPHA)
    randomize_lora(hf, model)  # B != 0, so A's gradient is not trivially zero
    tokens, pixels = batch(seed=6, size=6)

    out = hf(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref_loss = torch_clip_loss(out.image_embeds, out.text_embeds, hf.logit_scale.exp())
    ref_loss.backward()
    names = torch_lora.lora_parameter_names(hf)
    assert sorted(n for n, p in hf.named_parameters() if p.grad is not None) == sorted(names)

    def loss_fn(m, ids, px):
        o = m(ids, px)
        return mlx_clip_loss(o["image_embeds"], o["text_embeds"], mx.exp(m.logit_scale))

    inputs = (mx.array(tokens.astype(np.int32)), mx.array(pixels))
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    loss, grads = loss_and_grad(model, *inputs)
    grads = dict(tree_flatten(grads))
    assert sorted(grads) == sorted(names)
    assert rel_err(np.array(loss), ref_loss.detach().numpy()) <= 1e-6
    reference_grads = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}
    for name in names:
        assert np.linalg.norm(reference_grads[name]) > 0, name
        assert rel_err(grads[name], reference_grads[name]) <= 2e-5, name

    # The same step traced by mx.compile, with the model state as an implicit input.
    compiled = mx.compile(lambda ids, px: loss_and_grad(model, ids, px), inputs=model.state, outputs=model.state)
    c_loss, c_grads = compiled(*inputs)
    c_grads = dict(tree_flatten(c_grads))
    assert rel_err(np.array(c_loss), np.array(loss)) <= 1e-6
    for name in names:
        assert rel_err(c_grads[name], grads[name]) <= 1e-5, name


def test_dropout_only_in_training_and_no_rng_at_zero():
    hf, model = pair()
    mlx_lora.apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0)
    torch_lora.apply_lora(hf, rank=RANK, alpha=ALPHA, dropout=0.0)
    randomize_lora(hf, model)
    tokens, pixels = batch()
    model.train()
    hf.train()
    mx_state, torch_state = np.array(mx.random.state[0]), torch.get_rng_state()
    run_mlx(model, tokens, pixels)
    run_torch(hf, tokens, pixels)
    assert np.array_equal(np.array(mx.random.state[0]), mx_state)
    assert torch.equal(torch.get_rng_state(), torch_state)

    hf_d, model_d = pair()
    mlx_lora.apply_lora(model_d, rank=RANK, alpha=ALPHA, dropout=0.5)
    torch_lora.apply_lora(hf_d, rank=RANK, alpha=ALPHA, dropout=0.5)
    randomize_lora(hf_d, model_d)
    for m in (model, model_d, hf, hf_d):
        m.eval()
    image = {id(m): run(m, tokens, pixels)["image_embeds"] for m, run in
             ((model, run_mlx), (model_d, run_mlx), (hf, run_torch), (hf_d, run_torch))}
    assert np.array_equal(image[id(model_d)], image[id(model)])
    assert np.array_equal(image[id(hf_d)], image[id(hf)])
    model_d.train()
    hf_d.train()
    assert rel_err(run_mlx(model_d, tokens, pixels)["image_embeds"], image[id(model)]) > 1e-4
    assert rel_err(run_torch(hf_d, tokens, pixels)["image_embeds"], image[id(hf)]) > 1e-4

BAD = [
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank=True), "rank"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-1.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(seed=-1), "seed"),
    (dict(targets=("q_proj", "query")), "valid: q_proj, k_proj, v_proj, out_proj, fc1, fc2"),
    (dict(targets=()), "targets"),
    (dict(targets="q_proj"), "targets"),
    (dict(towers=("text_model", "image_model")), "valid: text_model, vision_model"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_options_raise_config_error(kwargs, message):
    hf, model = pair()
    options = {"rank": RANK, "alpha": ALPHA, **kwargs}
    for engine, target in ((mlx_lora, model), (torch_lora, hf)):
        with pytest.raises(ConfigError, match=message.split(":")[0]) as caught:
            engine.apply_lora(target, **options)
        assert message in str(caught.value)
        assert not engine.lora_parameter_names(target)  # nothing was changed


def test_applying_twice_raises():
    hf, model = pair()
    for engine, target in ((mlx_lora, model), (torch_lora, hf)):
        engine.apply_lora(target, rank=RANK, alpha=ALPHA, targets=("fc1",))
        with pytest.raises(ConfigError, match="already applied"):
            engine.apply_lora(target, rank=RANK, alpha=ALPHA, targets=("fc1",))
