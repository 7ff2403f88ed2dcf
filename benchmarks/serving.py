"""Load benchmark for `mlxclip serve`: N concurrent clients on loopback, micro-batched vs not.

Per engine, two servers run side by side on the same model: one micro-batching (`--max-batch-size
32`), one answering each request alone (`--max-batch-size 1`). For each concurrency level both are
measured in turn (unbatched first, so drift favours neither), after a warm-up that is not counted.
Each client sends one real JPEG per request to `/v1/embed/images` and waits for the answer; a level
stops after `requests` answers or `seconds`, whichever comes first. The clients share the machine
with the server, as a sidecar would.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlx_clip.benchmarks.bench_report import machine_line
from mlx_clip.environment import report as machine_report

MODES = {"unbatched": ["--max-batch-size", "1"], "batched": ["--max-batch-size", "32", "--max-wait-ms", "5"]}
PRESETS = {
    # model, concurrency levels, answers per level, seconds per level at most
    "tiny": ("tiny", (1, 16), 64, 5.0),
    "b32": ("vit-b32", (1, 4, 16), 400, 12.0),
}


def _payload() -> bytes:
    """A real photograph (scikit-learn's), shortest side 256 px as clients usually send, as JPEG."""
    import sklearn
    from PIL import Image

    with Image.open(Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg") as img:
        img = img.resize((341, 256), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mlxclip serve ARGS` in its own process on a free loopback port, returned once /health says
    200 (its output kept for the error if it exits first). The load benchmark and the server's
    tests both start servers with it.

    The server's output goes to a file, not a pipe: nobody reads a pipe while clients run, and a
    server that logs more than the pipe holds (64 KB) would block on its next log line."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 600, log_level: str = "warning"):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_clip", "serve", "--port", str(self.port), "--log-level", log_level, *args],
            stdout=self.log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout:.0f} s")

    def output(self) -> str:
        """Everything the server has printed so far (stdout and stderr)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _load(url: str, payload: bytes, clients: int, requests: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    failures = issued = 0
    deadline = time.perf_counter() + seconds

    async def client(http):
        nonlocal failures, issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            sent = time.perf_counter()
            response = await http.post(url + "/v1/embed/images", files=[("files", ("photo.jpg", payload))])
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"clients": clients, "answered": len(latencies), "failed": failures, "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99))}


def run(size: str = "tiny", out: str | Path = "benchmarks/results/serving", *,
        backends: tuple[str, ...] = ("mlx", "torch"), echo: Callable[[str], None] = print) -> dict:
    model, levels, requests, seconds = PRESETS[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload, rows, started = _payload(), [], time.perf_counter()
    for backend in backends:
        echo(f"[{time.perf_counter() - started:6.0f}s] starting {backend} servers ({model}) ...")
        # Quiet servers: a full stdout pipe would block them under load.
        servers = {mode: ServerProcess("--model", model, "--backend", backend, "--max-concurrent-requests", "1024",
                                       *flags, log_level="error") for mode, flags in MODES.items()}
        try:
            for clients in levels:
                for mode, server in servers.items():
                    echo(f"[{time.perf_counter() - started:6.0f}s] {backend} {mode}, {clients} clients ...")
                    asyncio.run(_load(server.url, payload, clients, 2 * clients, seconds))  # warm-up
                    rows.append({"engine": backend, "mode": mode,
                                 **asyncio.run(_load(server.url, payload, clients, requests, seconds))})
        finally:
            for server in servers.values():
                server.stop()
    results = {"size": size, "model": model, "levels": list(levels), "rows": rows,
               "ratios": _ratios(rows, max(levels)), "machine": machine_report(measure=False),
               "wall_s": time.perf_counter() - started}
    (out / "serving.json").write_text(json.dumps(results, indent=2))
    table = write_markdown(results, out / "serving.md")
    echo(table)
    echo(f"wrote {out / 'serving.json'}, {out / 'serving.md'} in {results['wall_s']:.0f} s")
    return results


def _ratios(rows: list[dict], clients: int) -> dict:
    ratios = {}
    for engine in {r["engine"] for r in rows}:
        at = {r["mode"]: r for r in rows if r["engine"] == engine and r["clients"] == clients}
        if {"batched", "unbatched"} <= set(at) and at["unbatched"]["requests_per_s"] > 0:
            ratios[engine] = at["batched"]["requests_per_s"] / at["unbatched"]["requests_per_s"]
    return ratios


def write_markdown(results: dict, path: Path) -> str:
    top = max(results["levels"])
    lines = [f"# mlxclip serve load — {results['model']}, one 341x256 JPEG per request to /v1/embed/images",
             "", machine_line(results["machine"]), "",
             "| engine | server | clients | answered | failed | requests/s | p50 ms | p90 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['engine']} | {r['mode']} | {r['clients']} | {r['answered']} | {r['failed']} | "
                     f"{r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['p99_ms']:.0f} |")
    lines += ["", f"| throughput at {top} clients, batched / unbatched (same run) | ratio |", "|---|---|"]
    lines += [f"| {engine} | {ratio:.2f}x |" for engine, ratio in sorted(results["ratios"].items())]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    import argparse

    import mlx_clip  # noqa: F401  (the BLAS loader, as the server process has it)

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(PRESETS), default="tiny")
    parser.add_argument("--out", default="benchmarks/results/serving")
    parser.add_argument("--backend", action="append", choices=["mlx", "torch"], default=None)
    args = parser.parse_args()
    run(args.size, args.out, backends=tuple(args.backend or ("mlx", "torch")))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
