"""The learning-rate schedule and the resolution schedule: what the trainer asks of each step."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning rate for update number `step` (0-based): linear warmup from peak/warmup to peak,
    then cosine decay to min_ratio * peak at the last step (open_clip's `cosine_lr`)."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    floor = peak * min_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def phased_lr(step: int, total_steps: int, probe_steps: int, peak: float, warmup_steps: int,
              min_ratio: float = 0.0) -> float:
    """`lr_at` for a run whose first `probe_steps` updates are LP-FT's probe phase: each phase has
    its own warmup and cosine (the paper's two stages, each its own run); 0: one schedule."""
    if not probe_steps:
        return lr_at(step, total_steps, peak, warmup_steps, min_ratio)
    if step < probe_steps:
        return lr_at(step, min(probe_steps, total_steps), peak, warmup_steps, min_ratio)
    return lr_at(step - probe_steps, total_steps - probe_steps, peak, warmup_steps, min_ratio)


def effective_warmup(warmup_steps: int, total_steps: int, probe_steps: int = 0) -> int:
    """The warmup a run follows: --warmup-steps, or a tenth of the shortest phase when it is not
    below it (LP-FT warms up anew in each of its two phases). A warmup as long as the run would
    keep the learning rate from ever reaching --lr (`--steps 10` under the default 50); the run
    says when it scales it, and a resumed run keeps the warmup it started with."""
    shortest = total_steps if not probe_steps else min(probe_steps, total_steps - probe_steps)
    return warmup_steps if warmup_steps < shortest else shortest // 10


def parse_resolution_schedule(text: str) -> list[tuple[int, int]]:
    """'0:160,2000:224' -> [(0, 160), (2000, 224)]: from each step on, the image size given
    (progressive resizing, then FixRes-style training at the final size)."""
    from mlx_clip.errors import ConfigError

    points = []
    for part in str(text).split(","):
        step, _, size = part.strip().partition(":")
        if not (step.strip().isdigit() and size.strip().isdigit()) or int(size) <= 0:
            raise ConfigError(f"--resolution-schedule {text!r}: expected STEP:SIZE pairs such as 0:160,2000:224")
        points.append((int(step), int(size)))
    steps = [s for s, _ in points]
    if steps[0] != 0 or steps != sorted(set(steps)):
        raise ConfigError(f"--resolution-schedule {text!r}: steps must start at 0 and increase")
    return points


def resolution_at(schedule: list[tuple[int, int]], step: int) -> int:
    """The image size of update number `step` (0-based)."""
    return [size for start, size in schedule if start <= step][-1]
