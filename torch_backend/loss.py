"""Contrastive losses for the torch engine: CLIP's InfoNCE and SigLIP's sigmoid loss.

The twin of `mlx_clip/mlx_backend/loss.py`: same functions, same signatures, same maths (the
docstrings there and here carry the formulas). Both equal open_clip's `ClipLoss` / `SigLipLoss` on one device.

A loss is a plain function

    loss(image_embeds, text_embeds, logit_scale, logit_bias=None, *, labels=None, ...) -> scalar

of L2-normalised embeddings (B, D), the already-exponentiated logit scale (a scalar tensor, as
open_clip passes `logit_scale.exp()`) and an optional learnable logit bias. To add one, write a
function with this signature in both modules and register it under the same key in `LOSSES`.
Both losses optionally take NegCLIP-style hard-negative captions (`negatives`, `negative_mask`).
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
    negatives: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
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
    negatives, negative_mask: hard-negative captions of NegCLIP (Yuksekgonul et al. 2023, "When
        and why vision-language models behave like bags-of-words", ICLR): (B, K, D) L2-normalised
        embeddings of each image's own extra captions, and (B, K) bool, True where a slot holds
        one. Both or neither. With e_ik = logit_scale * <image_i, negatives_ik> (+ logit_bias),
        image row i is a softmax over its n_i candidates, the B captions and its valid negatives:

            loss_i = -sum_j q_ij log p_ij,   p_i = softmax([s_i1..s_iB, e_ik for valid k])

        q_i is the target above on the captions and 0 on the negatives; smoothing gives eps / n_i
        to each candidate; hard_negative_beta counts the valid negatives among the negatives.
        Only image i sees its negatives: a caption wrong for image i ("a blue circle" for a red
        one) may be right for another image of the batch, which must not be pushed from it.
        NegCLIP's released code appends them to the batch, so every image sees all of them. The text->image side is unchanged (a negative caption has no
        image). Masked slots take no part and get zero gradient, whatever their padding holds.
    """
    _check_options(label_smoothing, hard_negative_beta)
    logits = _logits(image_embeds, text_embeds, logit_scale, logit_bias)
    positives = _positives(logits.shape[0], labels, logits.device)
    if negatives is None and negative_mask is None:
        per_image = _cross_entropy(logits, positives, label_smoothing, hard_negative_beta)
    else:
        extra, mask = _negative_logits(
            image_embeds, negatives, negative_mask, logit_scale, logit_bias
        )
        per_image = _cross_entropy_with_negatives(
            torch.cat([logits, extra], dim=1),  # (B, B + K)
            torch.cat([positives, torch.zeros_like(mask)], dim=1),
            torch.cat([torch.ones_like(positives), mask], dim=1),
            label_smoothing,
            hard_negative_beta,
        )
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
    negatives: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sigmoid loss of SigLIP, Zhai et al. 2023; open_clip's `SigLipLoss` on one device.

        loss = -sum_ij log sigmoid(z_ij * s_ij) / B,   s = logit_scale * img @ txt.T + logit_bias

    with z_ij = +1 for positive pairs (the diagonal, or same label when `labels` are given) and
    -1 otherwise. `logit_bias` may be None for no bias.

    negatives, negative_mask: hard-negative captions as in `clip_loss`. Each valid slot adds
    -log sigmoid(-e_ik) to the sum, e_ik = logit_scale * <image_i, negatives_ik> + logit_bias:
    a negative pair of its own image only (Yuksekgonul et al. 2023), still divided by B.
    """
    logits = _logits(image_embeds, text_embeds, logit_scale, logit_bias)
    batch = logits.shape[0]
    signs = 2 * _positives(batch, labels, logits.device).float() - 1
    total = -F.logsigmoid(signs * logits).sum()
    if negatives is not None or negative_mask is not None:
        extra, mask = _negative_logits(
            image_embeds, negatives, negative_mask, logit_scale, logit_bias
        )
        total = total - torch.where(mask, F.logsigmoid(-extra), 0.0).sum()
    return total / batch


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


def _negative_logits(
    image_embeds: torch.Tensor,
    negatives: Optional[torch.Tensor],
    negative_mask: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) float32 logits e_ik of each image against its own negatives, and the (B, K) mask."""
    if negatives is None or negative_mask is None:
        raise ValueError(
            "negatives and negative_mask must be given together, got "
            f"negatives {_shape(negatives)} and negative_mask {_shape(negative_mask)}"
        )
    negative_mask = torch.as_tensor(negative_mask, device=image_embeds.device).bool()
    batch, dim = image_embeds.shape
    if (
        negatives.ndim != 3
        or negatives.shape[0] != batch
        or negatives.shape[2] != dim
        or negative_mask.shape != negatives.shape[:2]
    ):
        raise ValueError(
            f"negatives must be (B, K, D) = ({batch}, K, {dim}) and negative_mask (B, K), got "
            f"{tuple(negatives.shape)} and {tuple(negative_mask.shape)} for image_embeds "
            f"{tuple(image_embeds.shape)}"
        )
    # Zeroing the padding keeps a nan or inf there out of the image gradient (0 * inf = nan).
    negatives = torch.where(negative_mask[..., None], negatives, 0.0)
    # Same association as `_logits`: (scale * img_i) . neg_ik.
    extra = (negatives @ (logit_scale * image_embeds)[:, :, None])[:, :, 0]  # (B, K)
    if logit_bias is not None:
        extra = extra + logit_bias
    return extra.float(), negative_mask


def _shape(tensor: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if tensor is None else tuple(tensor.shape)


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
        logits = logits + _hard_negative_log_weights(logits, ~positives, beta)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def _cross_entropy_with_negatives(
    logits: torch.Tensor,
    positives: torch.Tensor,
    candidates: torch.Tensor,
    label_smoothing: float,
    beta: float,
) -> torch.Tensor:
    """`_cross_entropy` over only the candidates of each row (all (B, C) tensors).

    The smoothing is written out (eps / n_i over the row's n_i candidates) because
    `F.cross_entropy(label_smoothing=)` would spread it over the masked slots too.
    """
    positives_f = positives.float()
    targets = positives_f / positives_f.sum(dim=1, keepdim=True)
    if label_smoothing:
        candidates_f = candidates.float()
        uniform = candidates_f / candidates_f.sum(dim=1, keepdim=True)
        targets = (1 - label_smoothing) * targets + label_smoothing * uniform
    if beta:
        logits = logits + _hard_negative_log_weights(logits, candidates & ~positives, beta)
    # Masked slots: softmax weight exp(_MASKED - max) = 0 and target 0, so zero gradient.
    logits = logits.masked_fill(~candidates, _MASKED)
    return F.cross_entropy(logits, targets)


def _hard_negative_log_weights(
    logits: torch.Tensor, negatives: torch.Tensor, beta: float
) -> torch.Tensor:
    """log w of Robinson et al. 2021 (see `clip_loss`) over the `negatives` entries; 0 elsewhere."""
    count = negatives.sum(dim=1, keepdim=True).clamp(min=1).float()
    scaled = beta * logits
    log_mean = torch.logsumexp(scaled.masked_fill(~negatives, _MASKED), dim=1, keepdim=True)
    log_mean = log_mean - torch.log(count)
    return torch.where(negatives, scaled - log_mean, torch.zeros_like(scaled))
