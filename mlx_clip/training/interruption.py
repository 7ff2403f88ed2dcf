"""How a run stops before its last step: the exceptions the trainer raises, and the signals
(SIGINT, SIGTERM) that ask it to stop at the next step boundary with a checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path

from mlx_clip.errors import MlxClipError


class TrainingStopped(MlxClipError):
    """The run stopped before its last step (non-finite losses, interruption)."""


class Interrupted(TrainingStopped):
    exit_code = 130


class StopSignals:
    """While installed, the first SIGINT or SIGTERM sets `requested`; the trainer checks it
    between steps."""

    def __init__(self):
        self.requested = False
        self._previous = self._previous_term = None

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        # A second Ctrl-C stops at once; the last complete checkpoint is still intact.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGINT, self._on_signal)
        # SIGTERM too: a launcher passes Ctrl-C on as SIGTERM, and `kill`, `timeout`, a container's
        # stop or a scheduler's preemption send it: each stops at a step boundary with a checkpoint.
        self._previous_term = signal.signal(signal.SIGTERM, self._on_signal)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)
        signal.signal(signal.SIGTERM, self._previous_term)


def stopped_at_once(step: int, latest: Path | None) -> Interrupted:
    """A second Ctrl-C (the first asks for a checkpoint at the next step) stops at once, even
    mid-save. A save is renamed into place whole, so the newest complete checkpoint stands."""
    where = f"the last complete checkpoint is {latest}; continue with --resume latest" if latest else \
        "no checkpoint was saved yet: run the same command again to start over"
    return Interrupted(f"stopped at once at step {step}; {where}")
