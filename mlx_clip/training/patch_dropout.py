"""Patch dropout (FLIP, Li et al. 2023; open_clip's `PatchDropout`): while training, each image
keeps a random share of its patches and the others never enter the vision transformer, so a step
costs less in proportion; evaluation and inference keep every patch.

Each image keeps `max(1, int(patches * (1 - rate)))` patches, as open_clip does (the class token,
where the model has one, always stays). They are drawn here, on the numpy side, from
`default_rng([seed, step, SALT])`, and both engines are handed the same indices. So the engines
drop the same patches (parity), and a resumed run draws what the uninterrupted run drew, since the
step decides and there is no RNG state to save. The indices are sorted: the model reads the kept
patches as a set (through the class token or the attention-pooling head), and sorting fixes their
order, and with it the float summation order.
"""

from __future__ import annotations

import numpy as np

SALT = 0x464C4950  # "FLIP": a stream of its own, apart from the augmentation's [seed, epoch, index]


def kept_count(patches: int, rate: float) -> int:
    return max(1, int(patches * (1 - rate)))


def keep_indices(seed: int, step: int, batch: int, patches: int, rate: float) -> np.ndarray:
    """(batch, kept) int32 patch indices, each row sorted and without repeats."""
    rng = np.random.default_rng([seed, step, SALT])
    order = np.argsort(rng.random((batch, patches)), axis=1, kind="stable")[:, :kept_count(patches, rate)]
    return np.sort(order, axis=1).astype(np.int32)
