"""Run folders and crash-safe checkpoints.

    OUT/config.json            the resolved TrainConfig
    OUT/metrics.jsonl          one JSON object per logged step / evaluation
    OUT/bad_images.txt         images skipped as unreadable, with the reason
    OUT/checkpoints/step-000100/{engine_state.safetensors, trainer.json}
    OUT/checkpoints/latest     name of the newest complete checkpoint
    OUT/final/                 the fine-tuned model (Hugging Face folder)
    OUT/final-ema/             with --ema-decay: the same model with the weights' moving average

A checkpoint is written into a temporary folder, flushed, and renamed into place; only then does
`latest` move (itself replaced atomically). A kill at any moment leaves the previous checkpoint
and its pointer intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mlx_clip.errors import CheckpointError, ConfigError

TRAINER_FILE = "trainer.json"


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable: until the directory itself is synced, a power cut
    can bring back the old entry even though the renamed files' data is on disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"
        self.final = self.root / "final"
        self.final_ema = self.root / "final-ema"

    # What a run leaves in its folder; another run may not mix into them.
    RUN_FILES = ("metrics.jsonl", "checkpoints", "final", "final-ema", "best", "bad_images.txt", "config.json",
                 "tensorboard")

    def existing(self) -> list[str]:
        """The run files already in the folder."""
        return [name for name in self.RUN_FILES if (self.root / name).exists()]

    def ever_stepped(self) -> bool:
        """Whether the run in this folder got anywhere: a checkpoint, a model, or a logged step.
        A run refused or interrupted before its first step leaves only its config and start
        record, which a new run may replace without --overwrite."""
        if self.complete_checkpoints() or self.final.exists() or self.final_ema.exists() or self.best.exists():
            return True
        try:
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        except OSError:
            return True  # unreadable: assume it holds work
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return True
            if int(record.get("step", 0) or 0) > 0:
                return True
        return False

    def check_claim(self, *, overwrite: bool, replaceable: bool = False) -> list[str]:
        """The run files a new run in this folder will replace; ConfigError if they hold a run
        that trained and neither `overwrite` nor `replaceable` (the demo's own folder holding a
        demo run) allows it. Nothing is deleted here: `clear` does that once the run can start."""
        present = self.existing()
        if present and self.ever_stepped() and not (overwrite or replaceable):
            raise ConfigError(f"--out {self.root} already holds a run ({', '.join(present)}); continue it with "
                              f"--resume latest, replace it with --overwrite, or choose another --out")
        return present

    def clear(self, names: list[str]) -> None:
        for name in names:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    @property
    def best(self) -> Path:
        return self.root / "best"

    def replace_best(self, write_model: Callable[[Path], None], record: dict) -> None:
        """Write a model folder beside OUT/best, then swap it in: a kill mid-save keeps the old best."""
        tmp = self.root / f".tmp-best-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_model(tmp)
        (tmp / "best.json").write_text(json.dumps(record, indent=1) + "\n")
        _fsync_tree(tmp)
        old = self.root / f".old-best-{os.getpid()}"
        if self.best.exists():
            os.rename(self.best, old)
        os.rename(tmp, self.best)
        fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def prepare(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoints.glob(".tmp-*"):  # left by a kill mid-save
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, write_engine_state: Callable[[Path], None], trainer_state: dict, keep: int) -> Path:
        self.prepare()
        name = f"step-{step:07d}"
        tmp = self.checkpoints / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_engine_state(tmp)
        (tmp / TRAINER_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        _fsync_tree(tmp)
        final = self.checkpoints / name
        if final.exists():  # re-saving a step after a resume: the old copy is equivalent
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.checkpoints)
        _write_atomic(self.checkpoints / "latest", name + "\n")
        self._prune(keep, protect=final)
        return final

    def _prune(self, keep: int, protect: Path) -> None:
        complete = self.complete_checkpoints()
        for old in complete[:-keep]:
            if old != protect:
                shutil.rmtree(old, ignore_errors=True)

    def complete_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / TRAINER_FILE).is_file())

    def latest(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if pointer.is_file():
            candidate = self.checkpoints / pointer.read_text().strip()
            if (candidate / TRAINER_FILE).is_file():
                return candidate
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def resolve_resume(self, resume: str) -> Path:
        if resume == "latest":
            found = self.latest()
            if found is None:
                hint = "; the run there never reached its first step: start it again without --resume" \
                    if self.existing() and not self.ever_stepped() else ""
                raise CheckpointError(f"--resume latest: no complete checkpoint in {self.checkpoints}{hint}")
            return found
        path = Path(resume)
        if not (path / TRAINER_FILE).is_file():
            raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {TRAINER_FILE})")
        return path


class FollowerRun(RunFolder):
    """The run folder as ranks other than 0 see it: they read checkpoints (to resume) but write
    nothing; rank 0 writes for all of them."""

    def check_claim(self, *, overwrite: bool, replaceable: bool = False) -> list[str]:
        return []

    def clear(self, names: list[str]) -> None:
        pass

    def prepare(self) -> None:
        pass

    def save(self, step: int, write_engine_state, trainer_state: dict, keep: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def replace_best(self, write_model, record: dict) -> None:
        pass


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{checkpoint / TRAINER_FILE}: unreadable checkpoint state ({err})") from None
