"""Gradients of the symmetric CLIP loss w.r.t. every parameter: MLX vs transformers + torch autograd.

Tolerance: relative L2 norm of the difference <= 2e-5 per parameter (float32; the backward pass
doubles the depth of accumulated rounding and small gradients amplify relative error). Measured on
this machine: 4.8e-7 to 1.7e-6 over the 74 parameters, the loss 9.4e-8 (bound 1e-6): each bound is
about 10x the largest measured."""

import numpy as np
import torch

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_clip.convert.layout import torch_to_mlx
from mlx_clip.mlx_backend.loss import clip_loss as mlx_clip_loss
from tests.helpers import random_pixels, random_tokens, rel_err, tiny_hf_clip
from tests.test_model_parity import mlx_from_hf
from mlx_clip.torch_backend.loss import clip_loss as torch_clip_loss
from mlx_clip.torch_backend.train import set_activation_checkpointing

EPS32 = float(np.finfo(np.float32).eps)


def test_clip_loss_gradients_match_torch():
    hf = tiny_hf_clip(seed=5, hidden_act="gelu")
    model = mlx_from_hf(hf)
    rng = np.random.default_rng(6)
    pixels, tokens = random_pixels(rng, 6, 32), random_tokens(rng, 6)

    out = hf(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref_loss = torch_clip_loss(out.image_embeds, out.text_embeds, hf.logit_scale.exp())
    ref_loss.backward()

    def loss_fn(m):
        o = m(mx.array(tokens.astype(np.int32)), mx.array(pixels))
        return mlx_clip_loss(o["image_embeds"], o["text_embeds"], mx.exp(m.logit_scale))

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert rel_err(np.array(loss), ref_loss.detach().numpy()) <= 1e-6
    grads = dict(tree_flatten(grads))
    reference = {k: p.grad for k, p in hf.named_parameters()}
    assert set(grads) == set(reference)
    scale = np.median([np.linalg.norm(g) for g in grads.values()])
    for name, grad in grads.items():
        ref = torch_to_mlx(name, reference[name].numpy())
        if name.endswith("k_proj.bias"):
            # Softmax over keys is invariant to a bias on the keys: the true gradient is 0 and
            # both engines return rounding noise, so compare against the typical gradient size.
            assert np.abs(np.array(grad)).max() <= 1e-5 * scale and np.abs(ref).max() <= 1e-5 * scale
            continue
        assert np.linalg.norm(ref) > 0, name
        assert rel_err(grad, ref) <= 2e-5, name


def _clip_loss_grads(model, tokens, pixels):
    def loss_fn(m):
        o = m(mx.array(tokens.astype(np.int32)), mx.array(pixels))
        return mlx_clip_loss(o["image_embeds"], o["text_embeds"], mx.exp(m.logit_scale))

    return dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model)[1]))


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing each layer in the backward pass (mx.checkpoint; transformers' switch on the torch
    side) recomputes the same operations in the same order. Measured: bit-identical gradients in both
    engines (3 seeds); the bound is one float32 epsilon (1.2e-7) of the largest gradient entry, room
    for a recomputation that reorders a sum, none for a different one."""
    hf = tiny_hf_clip(seed=7, hidden_act="gelu")
    model = mlx_from_hf(hf)
    rng = np.random.default_rng(8)
    pixels, tokens = random_pixels(rng, 6, 32), random_tokens(rng, 6)
    plain = _clip_loss_grads(model, tokens, pixels)
    model.set_gradient_checkpointing(True)
    recomputed = _clip_loss_grads(model, tokens, pixels)
    scale = max(float(np.abs(np.array(g)).max()) for g in plain.values())
    for name in plain:
        assert np.abs(np.array(recomputed[name]) - np.array(plain[name])).max() <= EPS32 * scale, name

    def torch_grads(checkpointing: bool):
        hf.zero_grad()
        hf.train()
        set_activation_checkpointing(hf, checkpointing)
        out = hf(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        torch_clip_loss(out.image_embeds, out.text_embeds, hf.logit_scale.exp()).backward()
        return {k: p.grad.clone() for k, p in hf.named_parameters()}

    a, b = torch_grads(False), torch_grads(True)
    assert hf.text_model.encoder.gradient_checkpointing  # the switch really took
    scale = max(float(g.abs().max()) for g in a.values())
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= EPS32 * scale, name
