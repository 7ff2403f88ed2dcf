"""The MLX engine's training step, built once as a pure function of module, optimizer and config
(mlx-lm's pattern): `nn.value_and_grad` inside `mx.compile` over model and optimizer state, one
`mx.eval` per step. `torch_backend/train.py` is its twin, line for line where the frameworks allow.

The step draws no random numbers (augmentation is seeded on the numpy side), so no RNG state is
captured by the compiled function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from mlx_clip.mlx_backend.loss import LOSSES
from mlx_clip.mlx_backend.model import CLIPModel, normalize
from mlx_clip.policy import TrainingPlan, training_plan
from mlx_clip.schedule import LOGIT_SCALE_MAX, decays

Step = Callable[[mx.array, mx.array, mx.array, mx.array], tuple[mx.array, mx.array, mx.array]]


class TrainModule(nn.Module):
    """What the optimizer sees: the CLIP, plus SigLIP's learnable bias when that loss is used.
    Parameter names ("clip.…", "logit_bias") are the same in the torch engine's state."""

    def __init__(self, clip: CLIPModel, logit_bias: float | None):
        super().__init__()
        self.clip = clip
        if logit_bias is not None:
            self.logit_bias = mx.array(logit_bias, dtype=mx.float32)

    def bias(self) -> mx.array | None:
        return self["logit_bias"] if "logit_bias" in self else None


class Training(NamedTuple):
    module: TrainModule
    optimizer: optim.Adam
    step: Step


def prepare(clip: CLIPModel, cfg) -> Training:
    """Everything a run needs beside the data, from a `TrainConfig`: `clip` is adapted in place."""
    plan = training_plan(cfg)
    module = TrainModule(clip, plan.logit_bias)
    module.train()
    apply_plan(clip, plan)
    clip.set_gradient_checkpointing(cfg.gradient_checkpointing)
    optimizer = make_optimizer(module, cfg)
    return Training(module, optimizer, make_train_step(module, optimizer, cfg, plan))


def apply_plan(clip: CLIPModel, plan: TrainingPlan) -> None:
    """Freeze and adapt `clip` in place as the plan says."""
    if plan.lora is not None:
        from mlx_clip.mlx_backend.lora import apply_lora

        lora = plan.lora
        apply_lora(clip, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, seed=lora.seed)
        clip.unfreeze(keys=list(plan.kept_trainable), recurse=False)
    for name in plan.frozen:
        getattr(clip, name).freeze()


def make_optimizer(module: TrainModule, cfg) -> optim.Adam:
    # Adam with the weight decay applied by the step (decoupled, on matrices only), as torch's
    # AdamW over two parameter groups; torch corrects bias, MLX's default does not.
    optimizer = optim.Adam(learning_rate=0.0, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps, bias_correction=True)
    optimizer.init(module.trainable_parameters())
    return optimizer


def make_train_step(module: TrainModule, optimizer: optim.Adam, cfg, plan: TrainingPlan) -> Step:
    """`step(pixels, ids, labels, lr) -> (loss, grad_norm, ok)`, compiled; a non-finite step
    leaves parameters and optimizer moments as they were."""
    loss_fn = LOSSES[cfg.loss]
    options = dict(plan.loss_options)
    decay_mask = dict(tree_flatten(tree_map_with_path(lambda path, p: decays(path, p.ndim),
                                                      module.trainable_parameters())))

    def compute_loss(module, pixels, ids, labels):
        image = normalize(module.clip.get_image_features(pixels))
        text = normalize(module.clip.get_text_features(ids))
        return loss_fn(image, text, mx.exp(module.clip.logit_scale), module.bias(), labels=labels, **options)

    loss_and_grad = nn.value_and_grad(module, compute_loss)
    state = [module.state, optimizer.state]

    def step(pixels, ids, labels, lr):
        loss, grads = loss_and_grad(module, pixels, ids, labels)
        flat = tree_flatten(grads)
        grads = tree_unflatten(flat)  # drops the empty branches of frozen towers
        norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in flat))
        if cfg.grad_clip > 0:  # as torch.nn.utils.clip_grad_norm_: always scale by min(1, c/(n+1e-6))
            coef = mx.minimum(cfg.grad_clip / (norm + 1e-6), 1.0)
            grads = tree_map(lambda g: (g * coef).astype(g.dtype), grads)
        ok = mx.isfinite(loss) & mx.isfinite(norm)
        old_params = dict(tree_flatten(module.trainable_parameters()))
        # apply_gradients mutates the optimizer's dict in place: keep the old arrays aside.
        old_state = dict(tree_flatten(optimizer.state))
        decayed = tree_unflatten([(k, p * (1 - lr * cfg.weight_decay) if decay_mask[k] else p)
                                  for k, p in old_params.items()])
        optimizer.learning_rate = lr
        new_params = dict(tree_flatten(optimizer.apply_gradients(grads, decayed)))
        if "clip.logit_scale" in new_params:
            new_params["clip.logit_scale"] = mx.clip(new_params["clip.logit_scale"], 0.0, LOGIT_SCALE_MAX)
        module.update(tree_unflatten([(k, mx.where(ok, v, old_params[k])) for k, v in new_params.items()]))
        kept = [(k, mx.where(ok, v, old_state[k]) if k in old_state else v)
                for k, v in tree_flatten(optimizer.state)]
        # Updated in place: the compiled function captures this dict object, not the name.
        optimizer.state.update(tree_unflatten(kept))
        return loss, norm, ok

    return mx.compile(step, inputs=state, outputs=state)
