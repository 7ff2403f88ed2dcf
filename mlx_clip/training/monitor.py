"""What a run shows while it trains and leaves behind: `metrics.jsonl` (one JSON object per line),
TensorBoard event files (`--tensorboard`), and the progress bar — or plain lines where stdout is
not a terminal. A failing log (disk full, unwritable folder) is reported once and never stops
training: losing a metric line costs less than losing the run."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": JSON has no literal for them, and the user must see them
    return value


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self.failed: str | None = None

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        except OSError as err:
            self._failure(f"cannot write {self.path} ({err.strerror or err}); training goes on without it")

    def _failure(self, message: str) -> None:
        if self.failed is None:  # once: a full disk would otherwise repeat it every step
            self.failed = message
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> int:
        """Drop records past `step` (written after the checkpoint a run resumes from), so the
        resumed run's records continue the file without duplicates. Returns how many went."""
        records = self.read()
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        if len(kept) != len(records):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        return len(records) - len(kept)


# Scalars of a metrics record that TensorBoard plots, under train/ (steps) or eval/ (evaluations).
_NOT_SCALARS = {"step", "time", "skipped", "event", "phase"}


class TensorBoardLog:
    """Event files in RUN/tensorboard through tensorboardX. A resumed run opens its writer with
    `purge_step`, so TensorBoard drops what the interrupted run logged past the checkpoint."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        # tensorboardX names an event file by the second it was opened and the host alone, and
        # opens it for writing: a second writer in the same second (the final evaluation after
        # training, or a quick resume) truncated the first. A nanosecond suffix keeps each file
        # unique and sorts them by creation, the order TensorBoard reads them in.
        self.writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=10,
                                    filename_suffix=f".{time.time_ns():020d}")

    def write(self, record: dict) -> None:
        if "event" in record or "phase" in record:  # facts about the run, not curves
            return
        step = int(record.get("step", 0))
        if isinstance(record.get("eval"), dict):
            items, prefix = record["eval"].items(), "eval/"
        else:
            items, prefix = record.items(), "train/"
        for key, value in items:
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(prefix + key.replace("@", "_at_"), value, step)

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """metrics.jsonl and, when asked, TensorBoard: every record goes to both, stamped with the time."""

    def __init__(self, run_root: Path, *, tensorboard: bool = False):
        self.metrics = MetricsLog(run_root / "metrics.jsonl")
        self.tensorboard_folder = run_root / "tensorboard" if tensorboard else None
        self.tensorboard: TensorBoardLog | None = None
        self._purge_step: int | None = None

    @property
    def path(self) -> Path:
        return self.metrics.path

    def resume_at(self, step: int) -> None:
        self.metrics.truncate_after(step)
        self._purge_step = step + 1

    def write(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        self.metrics.write(record)
        if self.tensorboard_folder is None:
            return
        try:
            if self.tensorboard is None:
                self.tensorboard = TensorBoardLog(self.tensorboard_folder, purge_step=self._purge_step)
            self.tensorboard.write(record)
        except Exception as err:  # tensorboardX raises OSError and its own types when it cannot write
            self.metrics._failure(f"cannot write TensorBoard events to {self.tensorboard_folder} "
                                  f"({type(err).__name__}: {err}); training goes on without them")
            self.tensorboard_folder = None

    def read(self) -> list[dict]:
        return self.metrics.read()

    def close(self) -> None:
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except Exception:  # reported already if writing failed; closing must not raise
                pass
            self.tensorboard, self._purge_step = None, None  # a later record opens a new event file


class SilentLog:
    """RunLog's interface, writing nothing (ranks other than 0)."""

    def __init__(self, path: Path):
        self.path = path

    def resume_at(self, step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


class Progress:
    """A tqdm bar on a terminal ("bar"), one plain line per logged step where output is a file or
    a pipe ("lines": CI logs, `nohup`), or nothing ("off": tests, the Python API; "silent": not even
    warnings, for the ranks other than 0 of a distributed run, which rank 0 speaks for)."""

    def __init__(self, total: int, initial: int, style: str | bool = "bar"):
        if style is True:
            style = "bar"
        elif style is False:
            style = "off"
        self.style, self.total = style, total
        self.bar = None
        if style == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)

    def update(self, steps: int, postfix: dict, step: int | None = None) -> None:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(shown, refresh=False)
        elif self.style == "lines" and step is not None:
            fields = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total} {fields}", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.style != "silent":  # warnings and phase changes are shown, unless another rank speaks
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
