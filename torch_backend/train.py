"""The torch engine's training step, built once as a function of module, optimizer and config: the
twin of `mlx_clip/mlx_backend/train.py` (same policy, same order of operations), in eager torch.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable

import torch

from mlx_clip.engine.base import Training
from mlx_clip.engine.policy import PROBED, TrainingPlan, default_loss
from mlx_clip.engine.policy import LOGIT_SCALE_MAX, decays, lr_scales, tower_depths
from mlx_clip.torch_backend.loss import LOSSES
from mlx_clip.torch_backend.model import image_features

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, bool]]


class TrainModule(torch.nn.Module):
    """What the optimizer sees: the CLIP, plus SigLIP's learnable bias when that loss is used.
    Parameter names ("clip.…", "logit_bias") are the same in the MLX engine's state."""

    def __init__(self, clip, logit_bias: float | None):
        super().__init__()
        self.clip = clip
        # A SigLIP model has its own learnable bias, which starts as its checkpoint has it.
        own = getattr(clip, "logit_bias", None) is not None
        self.logit_bias = None if logit_bias is None or own else torch.nn.Parameter(torch.tensor(logit_bias))

    def bias(self) -> torch.Tensor | None:
        own = getattr(self.clip, "logit_bias", None)
        return own if own is not None else self.logit_bias


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Switch a transformers model's activation checkpointing; transformers renamed the switch (the
    old `gradient_checkpointing_*` warns since 5.2x and goes in v6; older 5.x has only that one)."""
    switch = "enable" if enabled else "disable"
    (getattr(model, f"activation_checkpointing_{switch}", None) or getattr(model, f"gradient_checkpointing_{switch}"))()


def prepare(clip, cfg, plan: TrainingPlan, device: torch.device, world=None) -> Training:
    """Everything a run needs beside the data, from a `TrainConfig` and its plan: `clip` is
    adapted in place.

    With L2-SP (`cfg.l2_to_base`), the starting value of every tensor the run trains (in any
    phase) is copied aside; with `cfg.ema_decay`, a float32 copy starts those tensors' moving
    average; the engine saves and restores both with the optimizer state."""
    module = TrainModule(clip, plan.logit_bias).to(device)
    apply_plan(clip, plan)
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(clip, True)
    module.train()
    anchors = {n: p.detach().clone() for n, p in trainable(module)} if cfg.l2_to_base else None
    ema = {n: p.detach().float().clone() for n, p in trainable(module)} if cfg.ema_decay else None
    # float16's narrow range needs loss scaling; bfloat16 has float32's exponent and does not.
    scaler = torch.amp.GradScaler(device.type) if cfg.autocast_dtype == "float16" else None
    return enter_phase(module, cfg, plan, plan.phase_at(0), anchors, device, scaler, world, ema)


def enter_phase(module: TrainModule, cfg, plan: TrainingPlan, phase: str, anchors: dict | None,
                device: torch.device, scaler: torch.amp.GradScaler | None, world=None,
                ema: dict | None = None) -> Training:
    """A fresh optimizer and step for `phase` ("probe" | "full", see `policy`): at LP-FT's switch
    every parameter starts with empty AdamW state, as in `mlx_backend/train.py`; the L2-SP anchors,
    the weights' EMA and the loss scaler carry over."""
    if plan.probe_steps:
        set_probe(module.clip, phase == "probe")
    optimizer = make_optimizer(module, cfg)
    step = make_train_step(module, optimizer, cfg, plan, device=device, scaler=scaler, anchors=anchors, world=world,
                           ema=ema)
    return Training(module, optimizer, step, scaler=scaler, anchors=anchors, ema=ema)


def set_probe(clip, probe: bool) -> None:
    """LP-FT: with `probe`, only what the model has of `policy.PROBED` trains; else everything."""
    clip.requires_grad_(not probe)
    if probe:
        for path in PROBED:
            target = clip
            for name in path.split("."):
                target = getattr(target, name, None)
            if isinstance(target, (torch.nn.Module, torch.nn.Parameter)):
                target.requires_grad_(True)


def apply_plan(clip, plan: TrainingPlan) -> None:
    """Freeze and adapt `clip` (a `transformers.CLIPModel`) in place as the plan says."""
    if plan.lora is not None:
        from mlx_clip.torch_backend.lora import apply_lora

        lora = plan.lora
        apply_lora(clip, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, seed=lora.seed)
        own_bias = ("logit_bias",) if getattr(clip, "logit_bias", None) is not None else ()  # SigLIP's
        for name in plan.kept_trainable + own_bias:
            getattr(clip, name).requires_grad_(True)
    for name in plan.frozen:
        if hasattr(clip, name):  # SigLIP has no projections: its heads are inside the towers
            getattr(clip, name).requires_grad_(False)


def trainable(module: TrainModule) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def adam_steps(optimizer: torch.optim.AdamW, param: torch.Tensor) -> float:
    """Updates AdamW has applied to `param` (a skipped float16 step leaves it as it was)."""
    state = optimizer.state.get(param, {})
    return float(state["step"]) if "step" in state else 0.0


def layer_lr_scales(module: TrainModule, cfg) -> dict[str, float]:
    """Each trained parameter's lr multiplier (`policy.lr_scales`; all 1.0 without layer decay)."""
    return lr_scales([n for n, _ in trainable(module)], cfg.layer_decay, tower_depths(module.clip.config))


def make_optimizer(module: TrainModule, cfg) -> torch.optim.AdamW:
    """One group per (weight decay, lr scale): the step sets each group's lr to lr x its scale."""
    named = trainable(module)
    scales = layer_lr_scales(module, cfg)
    groups = [{"params": [p for n, p in named if decays(n, p.ndim) == decayed and scales[n] == scale],
               "weight_decay": cfg.weight_decay if decayed else 0.0, "lr_scale": scale}
              for decayed in (True, False) for scale in sorted(set(scales.values()), reverse=True)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=False)


def make_train_step(module: TrainModule, optimizer: torch.optim.AdamW, cfg, plan: TrainingPlan, *,
                    device: torch.device, scaler: torch.amp.GradScaler | None = None,
                    anchors: dict[str, torch.Tensor] | None = None, world=None,
                    ema: dict[str, torch.Tensor] | None = None) -> Step:
    """`step(pixels, ids, labels, lr, keep=None, negative_ids=None, negative_mask=None) -> (loss,
    grad_norm, ok)`; a non-finite step changes nothing. `keep`: patch dropout's (B, K) indices;
    `negative_ids` (B, K, L) and the global batch's `negative_mask` (B, K): hard-negative captions.

    With a `world` of several processes (`mlx_clip.engine.distributed`), pixels and ids are this rank's
    slice of the global batch and labels the global batch's: see `global_backward`.

    Mixed precision (`cfg.autocast_dtype`) runs the towers under `torch.autocast`, with float32
    master weights and optimizer state; the loss is computed in float32 (see `loss._logits`).

    Layer-wise lr decay scales each parameter group's lr (and so its L2-SP pull); `ema` (float32,
    by name) moves toward the new weights after every update the optimizer really made, as in
    `mlx_backend/train.py`.
    """
    loss_fn = LOSSES[cfg.loss or default_loss(module.clip.config)]
    options = dict(plan.loss_options)
    named = trainable(module)
    params = [p for _, p in named]
    clip = module.clip
    l2sp = cfg.l2_to_base if anchors is not None else 0.0
    scales = layer_lr_scales(module, cfg)
    autocast_dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None

    def embed(pixels, ids, keep=None, negative_ids=None):
        """(image, text) normalised embeddings, and (B, K, P) ones of the hard negatives when given."""
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None), \
                kept_patches(clip, keep):
            # A resolution schedule or aspect-ratio bucket trains at other sizes: positions
            # interpolated as in inference.
            outs = [image_features(clip, pixels).pooler_output,
                    clip.get_text_features(input_ids=ids).pooler_output]
            if negative_ids is not None:  # the B*K captions through the text tower as one batch
                outs.append(clip.get_text_features(input_ids=negative_ids.flatten(0, 1)).pooler_output)
        outs = [out.float() for out in outs]
        outs = [out / out.norm(dim=-1, keepdim=True) for out in outs]
        if negative_ids is not None:
            outs[2] = outs[2].reshape(*negative_ids.shape[:2], -1)
        return tuple(outs)

    if cfg.compile:
        embed = torch.compile(embed, dynamic=False)

    def rows_of(c, *optional):  # the chunk's rows of inputs only some runs have (None: absent)
        return tuple(None if value is None else value[c] for value in optional)

    def contrastive_loss(embeddings, labels, negative_mask):
        negatives = {} if len(embeddings) < 3 else {"negatives": embeddings[2], "negative_mask": negative_mask}
        return loss_fn(embeddings[0], embeddings[1], clip.logit_scale.exp(), module.bias(), labels=labels, **options,
                       **negatives)

    def global_backward(pixels, ids, labels, keep=None, negative_ids=None, negative_mask=None):
        """The loss of the global batch, its gradient left in .grad, summed over the ranks.

        open_clip's gather-with-grad, local_loss=False: every rank computes the global loss on the
        all-gathered embeddings, and backpropagates its slice of their gradient into its towers;
        a parameter's full-batch gradient is then the sum of the ranks' (each reaches the loss
        through its own samples only). The logit scale and bias enter only the loss, so every rank
        holds their full gradient: it is counted once (rank 0's; the others' are zeroed).
        With feature caching, the rank's slice is embedded and backpropagated micro-batch by
        micro-batch, as in `backward`."""
        from mlx_clip.torch_backend.distributed import all_gather, all_reduce_sum

        micro = cfg.micro_batch_size or pixels.shape[0]
        chunks = [slice(start, start + micro) for start in range(0, pixels.shape[0], micro)]
        if len(chunks) == 1:
            local = [embed(pixels, ids, keep, negative_ids)]
        else:
            with torch.no_grad():
                local = [embed(pixels[c], ids[c], *rows_of(c, keep, negative_ids)) for c in chunks]
        wholes = [all_gather(torch.cat([part[i] for part in local]).detach(), world).requires_grad_(True)
                  for i in range(len(local[0]))]
        loss = contrastive_loss(wholes, labels, negative_mask)
        (scaler.scale(loss) if scaler else loss).backward()
        start = world.shard(wholes[0].shape[0]).start
        for c, part in zip(chunks, local):
            outs = part if len(chunks) == 1 else embed(pixels[c], ids[c], *rows_of(c, keep, negative_ids))
            rows = slice(start + c.start, start + c.stop)
            pairs = [(out, whole.grad[rows]) for out, whole in zip(outs, wholes) if out.requires_grad]
            if pairs:
                torch.autograd.backward(*zip(*pairs))
        heads = {id(clip.logit_scale), id(module.bias())}
        grads = []
        for p in params:
            if p.grad is None:  # all ranks alike: a parameter the loss does not reach
                p.grad = torch.zeros_like(p)
            if id(p) in heads and not world.is_main:
                p.grad.zero_()
            grads.append(p.grad)
        all_reduce_sum(grads, world)
        return loss

    def backward(pixels, ids, labels, keep=None, negative_ids=None, negative_mask=None):
        """The loss, its gradients left in the parameters' .grad (scaled when a scaler is on)."""
        if world is not None and world.size > 1:
            return global_backward(pixels, ids, labels, keep, negative_ids, negative_mask)
        micro = cfg.micro_batch_size
        if not micro:
            loss = contrastive_loss(embed(pixels, ids, keep, negative_ids), labels, negative_mask)
            (scaler.scale(loss) if scaler else loss).backward()
            return loss
        # Feature caching, as mlx_backend/train.cached_step: embeddings without gradients, the
        # loss's gradient with respect to them, then each chunk's vector-Jacobian product.
        chunks = [slice(start, start + micro) for start in range(0, pixels.shape[0], micro)]
        with torch.no_grad():
            parts = [embed(pixels[c], ids[c], *rows_of(c, keep, negative_ids)) for c in chunks]
        wholes = [torch.cat([p[i] for p in parts]).requires_grad_(True) for i in range(len(parts[0]))]
        loss = contrastive_loss(wholes, labels, negative_mask)
        (scaler.scale(loss) if scaler else loss).backward()  # logit scale / bias get theirs here
        for c in chunks:
            pairs = [(out, whole.grad[c]) for out, whole in zip(embed(pixels[c], ids[c], *rows_of(c, keep, negative_ids)),
                                                                wholes)
                     if out.requires_grad]  # a locked tower has nothing to backpropagate into
            if pairs:
                torch.autograd.backward(*zip(*pairs))
        return loss

    def step(pixels, ids, labels, lr, keep=None, negative_ids=None, negative_mask=None):
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        loss = backward(pixels, ids, labels, keep, negative_ids, negative_mask)
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        ok = bool(torch.isfinite(loss) and torch.isfinite(norm))
        taken = adam_steps(optimizer, params[0])
        if l2sp and ok:
            # L2-SP (Li et al. 2018), decoupled as AdamW's weight decay: w -= lr * lambda * (w - w0),
            # every term at the weights before this step, applied only if the optimizer steps.
            with torch.no_grad():
                pulls = [(p, (p - anchors[n]) * (lr * scales[n] * l2sp)) for n, p in named]
        if scaler:
            # An overflow of the scaled float16 gradients is the scaler's business: it skips the
            # update and lowers the scale. The step counts as non-finite only if the loss is.
            if ok:
                scaler.step(optimizer)
            scaler.update()
            ok = bool(torch.isfinite(loss))
        elif ok:
            optimizer.step()
        stepped = ok and adam_steps(optimizer, params[0]) != taken  # the float16 scaler may have skipped it
        if l2sp and stepped:
            with torch.no_grad():
                for p, pull in pulls:
                    p.sub_(pull)
        if ok:
            with torch.no_grad():
                clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        if ema is not None and stepped:
            with torch.no_grad():
                for n, p in named:  # ema + (1 - decay) * (p - ema): timm's ModelEmaV3 lerp, in float32
                    ema[n].add_((p.float() - ema[n]).mul_(1 - cfg.ema_decay))
        return loss.detach(), norm, ok

    return step


@contextlib.contextmanager
def kept_patches(clip, keep: torch.Tensor | None):
    """Patch dropout on transformers' towers: while inside, the vision embeddings' output keeps the
    class token (CLIP; SigLIP has none) and the patches `keep` (B, K) names, each with its position,
    as `mlx_backend.model.keep_rows` does; outside, and with `keep` None, nothing changes."""
    if keep is None:
        yield
        return
    skip = 0 if clip.config.model_type in ("siglip", "siglip2") else 1

    def gather(module, args, out):
        index = keep.to(torch.int64)[..., None].expand(-1, -1, out.shape[-1])
        return torch.cat([out[:, :skip], torch.gather(out[:, skip:], 1, index)], dim=1)

    handle = clip.vision_model.embeddings.register_forward_hook(gather)
    try:
        yield
    finally:
        handle.remove()
