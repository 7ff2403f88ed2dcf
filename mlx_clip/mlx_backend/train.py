"""The MLX engine's training step, built once as a pure function of module, optimizer and config
(mlx-lm's pattern): `nn.value_and_grad` inside `mx.compile` over model and optimizer state, one
`mx.eval` per step. `torch_backend/train.py` is its twin, line for line where the frameworks allow.

The step draws no random numbers (augmentation is seeded on the numpy side), so no RNG state is
captured by the compiled function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from mlx_clip.mlx_backend.loss import LOSSES
from mlx_clip.mlx_backend.model import CLIPModel, normalize
from mlx_clip.mlx_backend.parallel import BatchSplit
from mlx_clip.engine.base import Training
from mlx_clip.engine.policy import PROBED, TrainingPlan, default_loss
from mlx_clip.engine.policy import LOGIT_SCALE_MAX, decays, lr_scales, tower_depths

Step = Callable[[mx.array, mx.array, mx.array, mx.array, dict], tuple[mx.array, mx.array, mx.array]]


class TrainModule(nn.Module):
    """What the optimizer sees: the CLIP, plus SigLIP's learnable bias when that loss is used.
    Parameter names ("clip.…", "logit_bias") are the same in the torch engine's state."""

    def __init__(self, clip: CLIPModel, logit_bias: float | None):
        super().__init__()
        self.clip = clip
        # A SigLIP model has its own learnable bias, which starts as its checkpoint has it.
        if logit_bias is not None and "logit_bias" not in clip:
            self.logit_bias = mx.array(logit_bias, dtype=mx.float32)

    def bias(self) -> mx.array | None:
        if "logit_bias" in self.clip:
            return self.clip["logit_bias"]
        return self["logit_bias"] if "logit_bias" in self else None


def prepare(clip: CLIPModel, cfg, plan: TrainingPlan, split: BatchSplit | None = None, group=None) -> Training:
    """Everything a run needs beside the data, from a `TrainConfig` and its plan: `clip` is
    adapted in place.

    With L2-SP (`cfg.l2_to_base`), the starting value of every tensor the run trains (in any
    phase) is kept in the optimizer state under "anchor", so it is saved and restored with it; with
    `cfg.ema_decay`, so is the moving average of those tensors, under "ema", in float32."""
    module = TrainModule(clip, plan.logit_bias)
    module.train()
    apply_plan(clip, plan)
    clip.set_gradient_checkpointing(cfg.gradient_checkpointing)
    anchors = module.trainable_parameters() if cfg.l2_to_base else None
    ema = tree_map(lambda p: p.astype(mx.float32), module.trainable_parameters()) if cfg.ema_decay else None
    return enter_phase(module, cfg, plan, plan.phase_at(0), anchors, split, group, ema)


def enter_phase(module: TrainModule, cfg, plan: TrainingPlan, phase: str, anchors: dict | None = None,
                split: BatchSplit | None = None, group=None, ema: dict | None = None) -> Training:
    """A fresh optimizer and a compiled step for `phase` ("probe" | "full", see `policy`).

    LP-FT's switch to "full" builds both anew: every parameter starts with empty Adam moments
    and step 0 (so bias correction restarts), as the second stage of Kumar et al.'s recipe starts
    a new optimizer from the probed model. The L2-SP anchors and the weights' EMA carry over
    unchanged."""
    if plan.probe_steps:
        set_probe(module.clip, phase == "probe")
    optimizer = make_optimizer(module, cfg)
    if anchors is not None:
        optimizer.state["anchor"] = anchors
    if ema is not None:
        optimizer.state["ema"] = ema
    compute_dtype = None
    if cfg.autocast_dtype and mx.default_device() == mx.cpu:
        warnings.warn(f"--precision {cfg.precision}: MLX's CPU backend multiplies {cfg.autocast_dtype} matrices at "
                      "~7 GFLOP/s against ~250 for float32, so the MLX engine trains in float32 here "
                      "(mixed precision applies on the GPU)", RuntimeWarning, stacklevel=2)
    elif cfg.autocast_dtype:
        compute_dtype = getattr(mx, cfg.autocast_dtype)
    step = make_train_step(module, optimizer, cfg, plan, compute_dtype=compute_dtype, split=split, group=group)
    return Training(module, optimizer, step)


def apply_plan(clip: CLIPModel, plan: TrainingPlan) -> None:
    """Freeze and adapt `clip` in place as the plan says."""
    if plan.lora is not None:
        from mlx_clip.mlx_backend.lora import apply_lora

        lora = plan.lora
        apply_lora(clip, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, seed=lora.seed)
        own_bias = ("logit_bias",) if "logit_bias" in clip else ()  # SigLIP's, trained as logit_scale is
        clip.unfreeze(keys=list(plan.kept_trainable) + list(own_bias), recurse=False)
    for name in plan.frozen:
        if name in clip:  # SigLIP has no projections: its heads are inside the towers
            getattr(clip, name).freeze()


def set_probe(clip: CLIPModel, probe: bool) -> None:
    """LP-FT: with `probe`, only what the model has of `policy.PROBED` trains; else everything."""
    clip.unfreeze()
    if not probe:
        return
    clip.freeze()
    for path in PROBED:
        *parents, leaf = path.split(".")
        owner = clip
        for name in parents:
            owner = owner[name] if name in owner else None
            if owner is None:
                break
        if owner is None or leaf not in owner:
            continue
        if isinstance(owner[leaf], nn.Module):
            owner[leaf].unfreeze()
        else:
            owner.unfreeze(keys=[leaf], recurse=False)


def make_optimizer(module: TrainModule, cfg) -> optim.Adam:
    """Adam's state (step, m, v) as MLX keeps it; `make_train_step` applies the update itself, as
    torch's AdamW does (bias-corrected, decoupled weight decay on matrices only)."""
    optimizer = optim.Adam(learning_rate=0.0, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps, bias_correction=True)
    optimizer.init(module.trainable_parameters())
    return optimizer


def make_train_step(module: TrainModule, optimizer: optim.Adam, cfg, plan: TrainingPlan, *,
                    compute_dtype=None, split: BatchSplit | None = None, group=None) -> Step:
    """`step(pixels, ids, labels, lr, extras=None) -> (loss, grad_norm, ok)`, compiled; a non-finite step
    leaves parameters and optimizer moments as they were. `extras` holds what only some runs have:
    patch dropout's (B, K) "keep" indices, and hard-negative captions' (B, K, L) "negative_ids" with
    their global (B, K) "negative_mask" (`loss.clip_loss`).

    With `compute_dtype` (mixed precision), the towers run on copies of the weights cast to it,
    inside the differentiated function, so the gradients reach the float32 master weights; the
    loss is computed in float32 (see `loss._logits`). `split` computes the towers slice by slice
    on CPU streams (`parallel.BatchSplit`); the loss always sees the whole batch.

    Clipping, weight decay, the Adam update and the non-finite guard are one expression per
    parameter, so `mx.compile` fuses each parameter's update into one pass over its memory
    (MLX's `apply_gradients` plus separate clip and guard passes read every weight 4 more times).

    With a `group` of several processes (`mx.distributed`), pixels and ids are this rank's slice of
    the global batch and labels the global batch's: the embeddings are all-gathered (MLX's VJP of
    `all_gather` hands each rank its own slice of the cotangent, open_clip's gather-with-grad), the
    loss is the global batch's, and the gradients are summed over the ranks (`global_gradients`).

    Layer-wise lr decay (`cfg.layer_decay`, `policy.lr_scales`) multiplies each parameter's lr, so
    its weight decay, Adam step and L2-SP pull, as torch's AdamW does with one lr per group. With
    `cfg.ema_decay`, a successful step also moves each trained tensor's float32 moving average
    toward its new value (timm's ModelEmaV3 lerp); a non-finite step leaves it as it was.
    """
    loss_fn = LOSSES[cfg.loss or default_loss(module.clip.config)]
    options = dict(plan.loss_options)
    l2sp = cfg.l2_to_base
    towers = split or (lambda tower, batch, *aligned: tower(batch, *aligned))
    decay_mask = dict(tree_flatten(tree_map_with_path(lambda path, p: decays(path, p.ndim),
                                                      module.trainable_parameters())))
    beta1, beta2, eps = cfg.beta1, cfg.beta2, cfg.eps
    scales = lr_scales(decay_mask, cfg.layer_decay, tower_depths(module.clip.config))
    ema_decay = cfg.ema_decay

    def compute_loss(module, pixels, ids, labels, extras):
        clip = module.clip
        if compute_dtype is not None:
            clip.update(tree_map(lambda p: p.astype(compute_dtype), clip.parameters()))
            # NaFlex's packed grids must stay exact (bfloat16 counts to 256); its tower casts the patches.
            if not clip.config.is_naflex:
                pixels = pixels.astype(compute_dtype)
        image = normalize(towers(clip.get_image_features, pixels, extras.get("keep")).astype(mx.float32))
        text = normalize(towers(clip.get_text_features, ids).astype(mx.float32))
        negatives = None
        if "negative_ids" in extras:
            negatives = embed_negatives(lambda rows: towers(clip.get_text_features, rows), extras["negative_ids"])
        if group is not None:  # (B/n, P) on each rank -> (B, P), ranks in order
            image, text = mx.distributed.all_gather(image, group=group), mx.distributed.all_gather(text, group=group)
            if negatives is not None:
                negatives = mx.distributed.all_gather(negatives, group=group)
        return loss_fn(image, text, mx.exp(clip.logit_scale.astype(mx.float32)), module.bias(), labels=labels,
                       **options, **negative_inputs(negatives, extras))

    loss_and_grad = nn.value_and_grad(module, compute_loss)
    state = [module.state, optimizer.state]

    def update(name, param, grad, moments, scalars, anchor):
        lr, c1, c2, keep1, new1, keep2, new2 = scalars
        if scales[name] != 1.0:  # at 1, the graph (and every bit) is that of a run without decay
            lr, c1 = lr * scales[name], c1 * scales[name]
        m = keep1 * moments["m"] + new1 * grad
        v = keep2 * moments["v"] + new2 * mx.square(grad)
        decayed = param * (1 - lr * cfg.weight_decay) if decay_mask[name] else param
        new = decayed - (c1.astype(grad.dtype) * m) / (mx.sqrt(v) * c2.astype(grad.dtype) + eps)
        if anchor is not None:
            # L2-SP (Li et al. 2018), decoupled as the weight decay: w -= lr * lambda * (w - w0),
            # every term at the weights before this step. lr is 0 on a non-finite step.
            new = new - (lr * l2sp).astype(param.dtype) * (param - anchor)
        if name == "clip.logit_scale":
            new = mx.clip(new, 0.0, LOGIT_SCALE_MAX)
        # The float32 lr and moments promote the arithmetic; bfloat16 / float16 parameters must
        # stay in their dtype (they silently became float32 after the first step).
        return new.astype(param.dtype), {"m": m, "v": v}

    def step(pixels, ids, labels, lr, extras=None):
        master = module.parameters()
        loss, grads = loss_and_grad(module, pixels, ids, labels, extras or {})
        if compute_dtype is not None:
            module.update(master)  # the loss left its low-precision copies in the module
        grads = dict(tree_flatten(grads))  # frozen towers have no entry
        if group is not None:
            grads = global_gradients(grads, group, heads=("clip.logit_scale", _bias_name(module)))
        return finish(loss, grads, lr)

    def finish(loss, grads, lr):
        norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for g in grads.values()))  # not ** 2: pow()
        ok = mx.isfinite(loss) & mx.isfinite(norm)
        # A non-finite step changes nothing, without a select per output (each would cost a pass
        # over memory): the gradient becomes 0, the moments keep all of their old value and the
        # learning rate is 0, so every update below reproduces its inputs bit for bit.
        coef = mx.minimum(cfg.grad_clip / (norm + 1e-6), 1.0) if cfg.grad_clip > 0 else 1.0
        lr = mx.where(ok, mx.array(lr, dtype=mx.float32), 0.0)
        steps = optimizer.state["step"] + 1
        c1 = lr / (1 - beta1 ** steps)
        c2 = mx.rsqrt(1 - beta2 ** steps)
        scalars = (lr, c1, c2, mx.where(ok, beta1, 1.0), mx.where(ok, 1 - beta1, 0.0),
                   mx.where(ok, beta2, 1.0), mx.where(ok, 1 - beta2, 0.0))
        params = dict(tree_flatten(module.trainable_parameters()))
        moments = dict(tree_flatten(optimizer.state, is_leaf=lambda node: isinstance(node, dict) and "m" in node))
        anchors = dict(tree_flatten(optimizer.state["anchor"])) if l2sp else {}
        averages = dict(tree_flatten(optimizer.state["ema"])) if ema_decay else {}
        # 0 on a non-finite step: ema + 0 * (param - ema) is ema, bit for bit.
        ema_weight = mx.where(ok, 1 - ema_decay, 0.0) if ema_decay else None
        new_params, new_moments = [], []
        for name, grad in grads.items():
            # as torch.nn.utils.clip_grad_norm_: always scale by min(1, c / (n + 1e-6))
            grad = mx.where(ok, (grad * coef).astype(grad.dtype), 0.0).astype(grad.dtype)
            param, moment = update(name, params[name], grad, moments[name], scalars, anchors.get(name))
            new_params.append((name, param))
            new_moments.append((name, moment))
            if ema_decay:
                average = averages[name]
                averages[name] = average + ema_weight * (param.astype(mx.float32) - average)
        module.update(tree_unflatten(new_params))
        # Updated in place: the compiled function captures this dict object, not the name.
        optimizer.state.update(tree_unflatten(new_moments))
        if ema_decay:  # whole: in LP-FT's probe phase it also holds the frozen towers' averages
            optimizer.state["ema"] = tree_unflatten(list(averages.items()))
        optimizer.state["step"] = mx.where(ok, steps, optimizer.state["step"])
        optimizer.state["learning_rate"] = mx.where(ok, lr, optimizer.state["learning_rate"])
        return loss, norm, ok

    micro = cfg.micro_batch_size
    if not micro:
        return mx.compile(step, inputs=state, outputs=state)
    if compute_dtype is not None:
        raise ValueError("feature caching (--micro-batch-size) runs in float32 on MLX; drop --precision")
    return cached_step(module, loss_fn, options, micro, mx.compile(finish, inputs=state, outputs=state), group)


def cached_step(module: TrainModule, loss_fn, options: dict, micro: int, finish, group=None) -> Step:
    """Feature caching (GradCache, Gao et al. 2021; open_clip's `accum_freq`): the contrastive
    loss sees the whole batch while the towers only ever hold `micro` samples' activations.

    1. embed the batch chunk by chunk without gradients; 2. the loss and its gradient with
    respect to the (B, P) embeddings, the logit scale and bias; 3. each chunk again with
    gradients, its parameters' gradient being the vector-Jacobian product of its embeddings with
    the cached embedding gradients, summed. The sum is the full-batch gradient (each parameter's
    gradient is linear in the embedding gradients), so the update equals the full-batch one up to
    float32 summation order. Each chunk is evaluated before the next, which is what bounds memory.

    With a `group`, the chunks are this rank's slice's: the embeddings are all-gathered for step 2,
    step 3 takes the rank's rows of their gradient, and the gradients are summed over the ranks
    (`global_gradients`)."""
    state = [module.state]

    def embed(pixels, ids, extras):
        """(image, text) embeddings of a chunk, and its hard negatives' when it has them."""
        clip = module.clip
        out = (normalize(clip.get_image_features(pixels, extras.get("keep")).astype(mx.float32)),
               normalize(clip.get_text_features(ids).astype(mx.float32)))
        if "negative_ids" in extras:
            out += (embed_negatives(clip.get_text_features, extras["negative_ids"]),)
        return out

    def head(image, text, log_scale, bias, negatives, labels, mask):
        return loss_fn(image, text, mx.exp(log_scale.astype(mx.float32)), bias, labels=labels, **options,
                       **negative_inputs(negatives, {"negative_mask": mask}))

    def surrogate(module, pixels, ids, embedding_grads, extras):
        return sum((out * grad).sum() for out, grad in zip(embed(pixels, ids, extras), embedding_grads))

    embed_c = mx.compile(embed, inputs=state)
    # nn.value_and_grad puts its traced parameters into the module: they are outputs too.
    chunk_grads = mx.compile(lambda *args: nn.value_and_grad(module, surrogate)(module, *args)[1], inputs=state,
                             outputs=state)

    def step(pixels, ids, labels, lr, extras=None):
        extras = extras or {}
        chunks = [slice(start, start + micro) for start in range(0, pixels.shape[0], micro)]
        # The loss's mask covers the global batch; the towers take the chunk's rows of the rest.
        per_row = {key: value for key, value in extras.items() if key != "negative_mask"}
        parts = []
        for part in chunks:
            parts.append(embed_c(mx.array(pixels[part]), ids[part], {k: v[part] for k, v in per_row.items()}))
            mx.eval(parts[-1])
        embeddings = [mx.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        offset = 0
        if group is not None:  # (B/n, ...) -> (B, ...); this rank's rows start at rank * B/n
            offset = group.rank() * embeddings[0].shape[0]
            embeddings = [mx.distributed.all_gather(e, group=group) for e in embeddings]
        image, text = embeddings[:2]
        negatives = embeddings[2] if len(embeddings) > 2 else None
        bias = module.bias()
        argnums = [0, 1, 2] + ([3] if bias is not None else []) + ([4] if negatives is not None else [])
        loss, head_grads = mx.value_and_grad(head, argnums=argnums)(image, text, module.clip.logit_scale, bias,
                                                                    negatives, labels, extras.get("negative_mask"))
        mx.eval(loss, head_grads)
        grad_of = dict(zip(argnums, head_grads))
        embedding_grads = [grad_of[0], grad_of[1]] + ([grad_of[4]] if negatives is not None else [])
        grads: dict[str, mx.array] = {}
        for part in chunks:
            rows = slice(offset + part.start, offset + part.stop)
            got = dict(tree_flatten(chunk_grads(mx.array(pixels[part]), ids[part], [g[rows] for g in embedding_grads],
                                                {k: v[part] for k, v in per_row.items()})))
            grads = got if not grads else {name: grads[name] + g for name, g in got.items()}
            mx.eval(grads)
        # The temperature and bias enter only the loss: their gradients come from step 2.
        for name, g in (("clip.logit_scale", grad_of[2]), (_bias_name(module), grad_of.get(3))):
            if g is not None and name in grads:
                grads[name] = grads[name] + g.astype(grads[name].dtype)
        if group is not None:
            grads = global_gradients(grads, group, heads=("clip.logit_scale", _bias_name(module)))
        return finish(loss, grads, lr)

    return step


def embed_negatives(text_features: Callable[[mx.array], mx.array], negative_ids: mx.array) -> mx.array:
    """(B, K, L) hard-negative token ids -> (B, K, P) normalised embeddings: the text tower runs on
    the B*K captions as one batch."""
    rows, slots, length = negative_ids.shape
    flat = normalize(text_features(negative_ids.reshape(rows * slots, length)).astype(mx.float32))
    return flat.reshape(rows, slots, -1)


def negative_inputs(negatives: mx.array | None, extras: dict) -> dict:
    """The loss's keyword arguments for hard negatives: none without them, so the loss runs its
    plain path."""
    if negatives is None:
        return {}
    return {"negatives": negatives, "negative_mask": extras["negative_mask"]}


def global_gradients(grads: dict[str, mx.array], group, heads: tuple[str, ...]) -> dict[str, mx.array]:
    """The full-batch gradient from each rank's: every rank backpropagated the global loss into
    its own samples only, so the towers' gradients add up over the ranks. The logit scale and bias
    enter only the loss, so every rank holds their full gradient: rank 0's counts, the others'
    are zeroed. One all_sum over a flat buffer, not one per tensor."""
    names = list(grads)
    parts = [mx.zeros_like(grads[n]) if n in heads and group.rank() != 0 else grads[n] for n in names]
    flat = mx.distributed.all_sum(mx.concatenate([g.reshape(-1) for g in parts]), group=group)
    out, offset = {}, 0
    for name, g in zip(names, parts):
        out[name] = flat[offset:offset + g.size].reshape(g.shape).astype(g.dtype)
        offset += g.size
    return out


def _bias_name(module: TrainModule) -> str:
    return "clip.logit_bias" if "logit_bias" in module.clip else "logit_bias"
