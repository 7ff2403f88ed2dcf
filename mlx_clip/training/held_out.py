"""The names of what a run measures on held-out data (its before/after table, metrics.jsonl's
evaluations, --keep-best, the forgetting guard, the domain-shift case): written once here."""

VAL_TOP1 = "val_zero_shot_top1"  # zero-shot top-1 on the held-out images of class folders
VAL_IMAGE_R1 = "val_image_retrieval_R@1"  # held-out captions: the right image first for a caption
VAL_TEXT_R1 = "val_text_retrieval_R@1"  # held-out captions: a right caption first for an image
CONTROL_TOP1 = "control_zero_shot_top1"  # zero-shot top-1 on --control-data, never trained on

# --keep-best names for the metrics people ask for most.
ALIASES = {"acc1": VAL_TOP1, "top1": VAL_TOP1, "R@1": VAL_IMAGE_R1, "control_acc1": CONTROL_TOP1}
