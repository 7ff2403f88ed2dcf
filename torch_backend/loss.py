"""Contrastive losses for the torch engine: CLIP's InfoNCE and SigLIP's sigmoid loss.

The twin of `mlx_clip/mlx_backend/loss.py`: same functions, same signatures, same maths (the
docstrings there and here carry the formulas). Both equal open_clip's `ClipLoss` / `SigLipLoss` on one device.

A loss is a plain function

    loss(image_embeds, text_embeds, logit_scale, logit_bias=None, *, labels=None, ...) -> scalar

of L2-normalised embeddings (B, D), the already-exponentiated logit scale (a scalar tensor, as
open_clip passes `logit_scale.exp()`) and an optional learnable logit bias. To add one, write a
function with this signature in both modules and register it under the same key in `LOSSES`.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mlx_clip.errors import ConfigError

# Stands in for -inf when a row of masked logits is reduced: a row with no entries left (a batch
# of one, or a batch of one class) would give -inf - (-inf) = nan, and nan poisons the gradient
# even where the result is later masked out.
_MASKED = -1e30


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    hard_negative_beta: float = 0.0,
) -> torch.Tensor:
    """Symmetric cross-entropy (InfoNCE) of CLIP, Radford et al. 2021; open_clip's `ClipLoss`.

    With logits s = logit_scale * image_embeds @ text_embeds.T (+ logit_bias), the loss is the
    mean of the image->text cross-entropy over the rows of s and the text->image one over the
    rows of s.T, each averaged over the batch.

    labels: optional (B,) int class ids. Pairs with the same label are all positives (FLYP-style
        fine-tuning on class folders): the target of a row is uniform over its positives instead
        of one-hot. Without labels only the diagonal is positive.
    label_smoothing: as `F.cross_entropy(label_smoothing=eps)`: the target becomes
        (1 - eps) * target + eps / B.
    hard_negative_beta: beta of Robinson et al. 2021, "Contrastive Learning with Hard Negative
        Samples" (ICLR), eq. 3 with tau+ = 0. Each negative k of row i is weighted in the
        softmax normaliser by

            w_ik = exp(beta * s_ik) / mean_{k' negative} exp(beta * s_ik')

        (mean weight 1 over the row's negatives; positives keep weight 1), so the loss of a row
        with one positive p is -log(e^s_ip / (e^s_ip + sum_k w_ik e^s_ik)). s is the logit, so
        beta is in logit units, as in the authors' code (github.com/joshr17/HCL), where it
        multiplies sim / temperature; a bias cancels in w. As there, gradients flow through w.
        In general the row's loss is the cross-entropy of its target against softmax(s + log w).
        0 is plain InfoNCE, computed without the reweighting.
    """
    _check_options(label_smoothing, hard_negative_beta)
    logits = _logits(image_embeds, text_embeds, logit_scale, logit_bias)
    positives = _positives(logits.shape[0], labels, logits.device)
    per_image = _cross_entropy(logits, positives, label_smoothing, hard_negative_beta)
    # labels are symmetric (same class both ways), so the text side has the same positives.
    per_text = _cross_entropy(logits.T, positives, label_smoothing, hard_negative_beta)
    return (per_image + per_text) / 2


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor],
    *,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sigmoid loss of SigLIP, Zhai et al. 2023; open_clip's `SigLipLoss` on one device.

        loss = -sum_ij log sigmoid(z_ij * s_ij) / B,   s = logit_scale * img @ txt.T + logit_bias

    with z_ij = +1 for positive pairs (the diagonal, or same label when `labels` are given) and
    -1 otherwise. `logit_bias` may be None for no bias.
    """
    logits = _logits(image_embeds, text_embeds, logit_scale, logit_bias)
    batch = logits.shape[0]
    signs = 2 * _positives(batch, labels, logits.device).float() - 1
    return -F.logsigmoid(signs * logits).sum() / batch


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"clip": clip_loss, "siglip": siglip_loss}


def _check_options(label_smoothing: float, hard_negative_beta: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if hard_negative_beta < 0.0:
        raise ConfigError(f"hard_negative_beta must be >= 0, got {hard_negative_beta}")


def _logits(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must both be (B, D), got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    # Same association as open_clip, `(scale * img) @ txt.T`.
    logits = logit_scale * image_embeds @ text_embeds.T  # (B, B)
    if logit_bias is not None:
        logits = logits + logit_bias
    # The softmax / log-sigmoid runs in float32 whatever the embedding dtype, as autocast does
    # for open_clip's loss under bf16.
    return logits.float()


def _positives(batch: int, labels: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(B, B) bool: which (image, text) pairs are positives."""
    if labels is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    labels = torch.as_tensor(labels, device=device)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    return labels[:, None] == labels[None, :]


def _cross_entropy(
    logits: torch.Tensor, positives: torch.Tensor, label_smoothing: float, beta: float
) -> torch.Tensor:
    """Mean over rows of the cross-entropy against targets uniform over each row's positives."""
    positives_f = positives.float()
    targets = positives_f / positives_f.sum(dim=1, keepdim=True)
    if beta:
        logits = logits + _hard_negative_log_weights(logits, positives, beta)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def _hard_negative_log_weights(
    logits: torch.Tensor, positives: torch.Tensor, beta: float
) -> torch.Tensor:
    """log w of Robinson et al. 2021 (see `clip_loss`): 0 on positives."""
    negatives = ~positives
    count = negatives.sum(dim=1, keepdim=True).clamp(min=1).float()
    scaled = beta * logits
    log_mean = torch.logsumexp(scaled.masked_fill(positives, _MASKED), dim=1, keepdim=True)
    log_mean = log_mean - torch.log(count)
    return torch.where(negatives, scaled - log_mean, torch.zeros_like(scaled))
