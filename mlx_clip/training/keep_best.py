"""--keep-best: the model of the best evaluation so far, kept in OUT/best (swapped in whole, so a
kill mid-save keeps the previous best); its record is saved with every checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_clip.errors import ConfigError
from mlx_clip.training.held_out import ALIASES
from mlx_clip.training.run_folder import RunFolder


class KeepBest:
    def __init__(self, wanted: str | None, run: RunFolder, write_model: Callable[[Path], object]):
        self.wanted, self.run = wanted, run
        self.write_model = write_model  # writes the model as a folder (the engine's save, as HF)
        self.record: dict | None = None  # {metric, value, step}

    def consider(self, metrics: dict, step: int, echo: Callable[[str], None] = print) -> None:
        """Save the model when this evaluation beats every earlier one."""
        if not self.wanted:
            return
        key = ALIASES.get(self.wanted, self.wanted)
        if key not in metrics:
            raise ConfigError(f"--keep-best {self.wanted}: this run's evaluations have no such metric; they have "
                              f"{', '.join(sorted(metrics))} (or the aliases {', '.join(ALIASES)})")
        value = float(metrics[key])
        if self.record is not None and not value > self.record["value"]:
            return
        self.record = {"metric": key, "value": value, "step": step}
        self.run.replace_best(self.write_model, self.record)
        echo(f"step {step}: best {key} so far ({value:.4f}); saved to {self.run.best}")
