"""Data-parallel fine-tuning over several processes, as the launchers describe it (framework-free).

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `mlx.launch` sets MLX_RANK and, for
the ring backend, MLX_HOSTFILE (the world size is the hostfile's length, which only MLX reads, so
it is asked of `mx.distributed` once the engine joins). Each engine joins its own framework's
process group in `prepare_training`; everything here is what the toolkit decides around it:

- the loader makes the *global* batch in the same order as one process, and each rank takes its
  contiguous slice `[rank*B/n, (rank+1)*B/n)` (`World.shard`), so resume is the one-process resume;
- the loss sees the global batch (the engines all-gather the embeddings, gradients flowing back to
  the rank's own slice), the gradients are summed, so every rank applies the same update;
- rank 0 alone writes metrics, checkpoints and final/ (`checkpoint.FollowerRun` and
  `monitor.SilentLog` for the others), while every rank takes part in every collective;
- a collective that fails (a rank died) or outlasts MLXCLIP_COLLECTIVE_TIMEOUT seconds (a rank
  hangs) ends the process with one line (`Watchdog`, `PeerLost`).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass

from mlx_clip.errors import ConfigError, MlxClipError

TIMEOUT_VARIABLE = "MLXCLIP_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # a ViT-B/32 step plus its all-reduce on a slow link fits many times over


class PeerLost(MlxClipError):
    """A collective failed: another rank died or cannot be reached."""

    exit_code = 1


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    launcher: str | None = None  # "torchrun" | "mlx.launch" | None (one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: int) -> slice:
        """This rank's contiguous slice of a global batch of `rows`."""
        per = rows // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def check_batch(self, batch_size: int) -> None:
        if self.size == 1:
            return
        if batch_size % self.size:
            raise ConfigError(f"--batch-size is the global batch and must divide evenly over the {self.size} "
                              f"processes, got {batch_size}")


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_VARIABLE)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {raw!r}")
    return value


def launched(backend: str) -> World | None:
    """The launcher's description of this process for engine `backend`, or None for one process.
    The MLX world size is not in the environment: the engine fills it in when it joins."""
    if backend == "torch" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "torchrun")
    if backend == "mlx" and "MLX_RANK" in os.environ:
        return World(int(os.environ["MLX_RANK"]), 0, "mlx.launch")
    return None


class Watchdog:
    """Ends the process with one line when a guarded section (a step with its collectives) runs
    past the timeout: a rank that hangs, or a transport that never notices its peer is gone (MLX's
    ring waits on its socket), must not hang the others forever."""

    def __init__(self, world: World, seconds: float):
        self.world, self.seconds = world, seconds
        self._deadline: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True, name="mlxclip-watchdog").start()

    def start(self, what: str) -> None:
        with self._lock:
            self._deadline, self._what = time.monotonic() + self.seconds, what

    def stop(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                print(f"error: rank {self.world.rank} of {self.world.size}: {what} did not finish within "
                      f"{self.seconds:g} s ({TIMEOUT_VARIABLE}): another rank died or hangs; resume from the "
                      "last checkpoint with --resume latest", file=sys.stderr, flush=True)
                os._exit(PeerLost.exit_code)


def peer_lost(world: World, what: str, err: BaseException) -> PeerLost:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # gloo's "[/path/pair.cc:545] Read error ...: Connection reset by peer. This is typically ...":
    # its first sentence, without the source location.
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first).split(". ")[0]
    return PeerLost(f"rank {world.rank} of {world.size}: {what} failed ({first[:200]}): another rank died or "
                    "cannot be reached; resume from the last checkpoint with --resume latest")
