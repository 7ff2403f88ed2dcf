"""Data loading at scale: a captions manifest, parquet and webdataset shards, 10k to 1M samples.

    python -m mlx_clip.benchmarks.data [--sizes 10000,100000,1000000] [--work DIR]
                                       [--out benchmarks/results/data] [--batches 30] [--skip-batches 250]
                                       [--steady-batches 313] [--workers 2] [--tokenizer clip|stub]
                                       [--decoded-cache] [--no-webdataset] [--profile]

For each format and size a FRESH `python` process (clean imports and RSS) runs what training runs:
`load_dataset(path)` (mlx_clip.data.records), `BatchLoader(data.samples, batch_size=32,
image_size=32, tokenize=..., seed=0, num_workers=2, decoded_cache_bytes=0)` and `next_batch()`,
then `--batches` more batches, and prints as JSON:
- first batch: the seconds from the start of `load_dataset` to the first batch (the imports,
  `mlx_clip.data.parquet` and `.shards` included, come before the clock starts);
- peak RSS: VmHWM (/proc/self/status) after those batches. Not `getrusage(RUSAGE_SELF).ru_maxrss`:
  Linux folds the high-water mark of the image exec replaced (the forked parent's) into it, so a
  fresh child of a big parent reports the parent's peak (it is kept in the JSON as `ru_maxrss_mb`);
- images/s: batches/s x 32 over the `--batches` after the first; then, after `--skip-batches`, a
  steady window of `--steady-batches` (313 x 32: about one 10,000-sample shard, so opening shards
  and row groups is paid in proportion, and past the fill of webdataset's shuffle buffer). The
  goals on images/s are evaluated on both figures.
The loader's decoded-image cache is off unless `--decoded-cache`: the manifest's rows name only
10,000 distinct files, which the cache would serve from memory once decoded, as it would not for a
manifest of a million files.

Formats, generated once into `--work` (default `$TMPDIR/mlxclip-databench`) and reused while their
parameters match (a stamp file beside each; all three sizes: ~2 minutes and ~3.2 GB):
- manifest: `manifest/captions-N.csv` (`image,caption`) whose rows name `min(N, 10000)` distinct
  JPEG files in `manifest/images/` (a million files would be too slow to create and too much disk):
  row i names file i mod 10000, so each file is named by N / 10000 rows;
- parquet: 4 files (pyarrow, row groups of 1000 rows), columns `image` (Hugging Face's image
  struct `{"bytes", "path"}`) and `caption`;
- shards: webdataset tars written with `tarfile` (`{key}.jpg` + `{key}.txt`), 10,000 samples a
  shard but at least 4 shards (so each of open_clip's 2 workers gets shards), with the
  `manifest.json` `mlxclip shard` writes.
Sample i is always image i mod 1000 of one pool of 1000 distinct random 32x32 JPEGs (~350 bytes)
and caption "a photo of item {i}", so every format holds the same images.

The comparison row runs open_clip's own training pipeline, `open_clip_train.data.get_wds_dataset`
(open_clip_torch's, with `is_train=True`: shard shuffle, split_by_node/worker, tarfile_to_samples,
shuffle(5000, initial=1000), decode("pilrgb"), `open_clip.image_transform(32, is_train=False)`,
to_tuple, batched(32), a `WebLoader` with the same worker count) on the same shards, in the same
kind of fresh process. Two things are adjusted in that process, not in the installed packages:
`open_clip_train.data` imports pandas for its CSV dataset only, so without pandas an empty stand-in
module takes its place; and its `tarfile_to_samples_nothrow` is replaced by the same function with
`tar_file_expander(..., eof_value=None)` (the fix of open_clip#935 / webdataset#384): webdataset
1.0 ends each shard with an `{}` marker that open_clip_train 3.3.0's `group_by_keys_nothrow` fails
on (`KeyError: 'fname'`), so unpatched the pipeline does not run at all.

Writes data.json, data.md and data.png into `--out`: the table (format, samples, first batch, peak
RSS, images/s), the goal lines evaluated PASS/FAIL from the measured numbers, and the CPU. With
`--profile`, load_dataset and the first batch of each format at the largest size also run under
cProfile (one more fresh process each, num_workers=0 so that the decoding is on the profiled
thread): the 15 most expensive calls (cumulative) and the 10 with the most own time go in the report.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlx_clip.benchmarks.data_make import (FORMATS, IMAGE_SIZE, MANIFEST_FILES, MB, PARQUET_FILES, POOL_IMAGES,
                                           ROW_GROUP, dataset_path, disk_bytes, manifest_files, prepare,
                                           shard_samples)
from mlx_clip.benchmarks.data_report import WDS_NAME, _brief, goals, write_markdown, write_png

DEFAULT_SIZES = "10000,100000,1000000"
BATCH_SIZE = 32


# ---------------------------------------------------------------------------------------------
# the measuring processes


def peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM where /proc has it. Linux's `ru_maxrss` carries the
    high-water mark of the memory image exec replaced (here: the parent's, forked), so a fresh child
    of a big parent reports the parent's peak; VmHWM starts again at exec. `ru_maxrss` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mb()


def ru_maxrss_mb(who: str = "self") -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN)
    return usage.ru_maxrss / (MB if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _throughput(next_batch: Callable[[], object], spec: dict) -> dict:
    """images/s over `batches` batches; then, after `skip_batches` more, over `steady_batches`."""
    tic = time.perf_counter()
    for _ in range(spec["batches"]):
        next_batch()
    out = {"images_per_s": spec["batches"] * spec["batch_size"] / (time.perf_counter() - tic),
           "batches_timed": spec["batches"], "peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb()}
    if spec.get("steady_batches"):
        for _ in range(spec.get("skip_batches", 0)):
            next_batch()
        tic = time.perf_counter()
        for _ in range(spec["steady_batches"]):
            next_batch()
        out.update(steady_images_per_s=spec["steady_batches"] * spec["batch_size"] / (time.perf_counter() - tic),
                   steady_batches=spec["steady_batches"], skip_batches=spec.get("skip_batches", 0),
                   final_peak_rss_mb=peak_rss_mb())
    return out


def _tokenizer(kind: str):
    if kind == "stub":
        return lambda texts: np.zeros((1 if isinstance(texts, str) else len(texts), 77), np.int64)
    from mlx_clip.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()  # OpenAI's CLIP BPE: what the built-in CLIP models use
    tokenizer(["warm up"])
    return tokenizer


def measure_loader(spec: dict) -> dict:
    """In a fresh process: load_dataset -> BatchLoader -> first batch, then `batches` more."""
    import importlib

    for module in ("mlx_clip.data.parquet", "mlx_clip.data.shards"):  # load_dataset's lazy imports: before the clock
        importlib.import_module(module)
    from mlx_clip.data.loader import BatchLoader
    from mlx_clip.data.records import load_dataset

    tokenize = _tokenizer(spec["tokenizer"])
    rss_imports = peak_rss_mb()
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    data = load_dataset(spec["path"])
    loaded = time.perf_counter()
    rss_loaded = peak_rss_mb()
    cache = {} if spec.get("decoded_cache") else {"decoded_cache_bytes": 0}
    loader = BatchLoader(data.samples, batch_size=spec["batch_size"], image_size=spec["image_size"],
                         tokenize=tokenize, seed=0, num_workers=spec["workers"], **cache)
    built = time.perf_counter()
    first = loader.next_batch()
    done = time.perf_counter()
    if profiler is not None:
        import pstats

        profiler.disable()
        listings = []
        for order, count in (("cumulative", 15), ("tottime", 10)):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(count)
            listings += [f"sorted by {order}:"] + _profile_lines(text.getvalue(), count) + [""]
        loader.close()
        return {"profile": listings[:-1], "first_batch_s": done - start, "load_dataset_s": loaded - start}
    rss_first = peak_rss_mb()
    assert first.pixels.shape == (spec["batch_size"], spec["image_size"], spec["image_size"], 3)
    measured = _throughput(loader.next_batch, spec)
    loader.close()
    return {"samples_read": len(data.samples), "load_dataset_s": loaded - start, "batch_loader_s": built - loaded,
            "next_batch_s": done - built, "first_batch_s": done - start, "rss_after_imports_mb": rss_imports,
            "rss_after_load_dataset_mb": rss_loaded, "rss_first_batch_mb": rss_first, **measured}


def _profile_lines(text: str, count: int) -> list[str]:
    lines = text.strip().splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    head = [line.strip() for line in lines[:at] if "function calls" in line]
    return head + lines[at:at + 1 + count]


def measure_webdataset(spec: dict) -> dict:
    """In a fresh process: open_clip_train's get_wds_dataset on the shards, first batch and throughput."""
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("pandas") is None:  # only open_clip_train's CsvDataset uses it
        stand_in = types.ModuleType("pandas")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        sys.modules["pandas"] = stand_in
    import open_clip_train.data as open_clip_data
    from open_clip import image_transform
    from open_clip_train.data import get_wds_dataset
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=open_clip_data.log_and_continue):
        # open_clip's own function with the fix of open_clip#935 / webdataset#384: webdataset >= 0.2.96 ends
        # each shard with an `{}` marker that open_clip_train 3.3.0's group_by_keys_nothrow cannot take
        # (KeyError: 'fname'); `eof_value=None` turns the marker off, as webdataset did before.
        files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
        return open_clip_data.group_by_keys_nothrow(files, handler=handler)

    open_clip_data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow  # get_wds_dataset looks it up per call

    tokenize = _tokenizer(spec["tokenizer"])
    preprocess = image_transform(spec["image_size"], is_train=False)
    args = types.SimpleNamespace(train_data=spec["pattern"], val_data=None, train_num_samples=spec["samples"],
                                 dataset_resampled=False, train_data_upsampling_factors=None, seed=0,
                                 batch_size=spec["batch_size"], workers=spec["workers"], world_size=1)
    rss_imports = peak_rss_mb()
    start = time.perf_counter()
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenize)
    state = {"batches": iter(info.dataloader), "epoch": 0}
    images, _ = next(state["batches"])
    done = time.perf_counter()
    assert tuple(images.shape) == (spec["batch_size"], 3, spec["image_size"], spec["image_size"])
    rss_first = peak_rss_mb()

    def next_batch():
        try:
            return next(state["batches"])
        except StopIteration:  # the epoch is used up: the next one, as open_clip's training loop starts it
            state["epoch"] += 1
            info.set_epoch(state["epoch"])
            state["batches"] = iter(info.dataloader)
            return next(state["batches"])

    measured = _throughput(next_batch, spec)
    shutdown = getattr(state["batches"], "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    return {"first_batch_s": done - start, "rss_after_imports_mb": rss_imports, "rss_first_batch_mb": rss_first,
            **measured, "workers_ru_maxrss_mb": ru_maxrss_mb("children"), "epochs_started": state["epoch"]}


def run_child(spec: dict, timeout: float = 3600) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # how busy the machine was: beside the figures
    try:
        done = subprocess.run([sys.executable, "-m", "mlx_clip.benchmarks.data", "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "failed").splitlines()
        return {"error": lines[-1][:300], "stderr_tail": lines[-15:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_average_before": load}


# ---------------------------------------------------------------------------------------------
# the run and its report


def run(sizes: list[int], work: str | Path, out: str | Path = "benchmarks/results/data", *, batches: int = 30,
        skip_batches: int = 250, steady_batches: int = 313, workers: int = 2, tokenizer: str = "clip",
        decoded_cache: bool = False, webdataset: bool = True, profile: bool = False,
        echo: Callable[[str], None] = print) -> dict:
    from mlx_clip.benchmarks.bench_report import machine_line
    from mlx_clip.environment import cpu
    from mlx_clip.environment import report as machine_report

    sizes = sorted(set(sizes))
    work, out = Path(work).expanduser(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    generation = prepare(work, sizes, echo)
    common = {"batch_size": BATCH_SIZE, "image_size": IMAGE_SIZE, "workers": workers, "batches": batches,
              "skip_batches": skip_batches, "steady_batches": steady_batches, "tokenizer": tokenizer,
              "decoded_cache": decoded_cache}
    rows, comparison, profiles = [], [], {}
    for n in sizes:
        for fmt in FORMATS:
            path = dataset_path(work, fmt, n)
            echo(f"[{time.perf_counter() - started:6.0f}s] {fmt} {n:,} ...")
            row = {"format": fmt, "samples": n, "path": str(path), "disk_mb": disk_bytes(path) / MB,
                   **run_child({"mode": "loader", "path": str(path), **common})}
            if fmt == "manifest":
                row["distinct_files"] = manifest_files(n)
            rows.append(row)
            echo("    " + _brief(row))
        if webdataset:
            folder = dataset_path(work, "shards", n)
            count = len(list(folder.glob("*.tar")))
            pattern = str(folder / f"{{{0:05d}..{count - 1:05d}}}.tar")
            echo(f"[{time.perf_counter() - started:6.0f}s] {WDS_NAME} {n:,} ...")
            row = {"format": WDS_NAME, "samples": n, "path": pattern,
                   **run_child({"mode": "webdataset", "pattern": pattern, "samples": n, **common})}
            comparison.append(row)
            echo("    " + _brief(row))
    if profile:
        for fmt in FORMATS:
            echo(f"[{time.perf_counter() - started:6.0f}s] profiling {fmt} {max(sizes):,} ...")
            # num_workers=0: the decodes (and the shard or row group they open) run on the profiled thread
            profiles[fmt] = run_child({"mode": "loader", "path": str(dataset_path(work, fmt, max(sizes))),
                                       **common, "profile": True, "workers": 0, "steady_batches": 0})
    machine = machine_report(measure=False)
    results = {"sizes": sizes, "settings": {**common, "pool_images": POOL_IMAGES, "manifest_files": MANIFEST_FILES,
                                            "shard_samples": {n: shard_samples(n) for n in sizes},
                                            "parquet_files": PARQUET_FILES, "row_group": ROW_GROUP,
                                            "work": str(work)},
               "rows": rows, "comparison": comparison, "profiles": profiles, "cpu": cpu(), "machine": machine,
               "machine_line": machine_line(machine), "generation": generation}
    results["goals"] = goals(rows, comparison, sizes)
    results["wall_s"] = time.perf_counter() - started
    (out / "data.json").write_text(json.dumps(results, indent=2))
    text = write_markdown(results, out / "data.md")
    write_png(results, out / "data.png")
    echo(text)
    echo(f"wrote {out / 'data.json'}, {out / 'data.md'}, {out / 'data.png'} in {results['wall_s']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="sample counts, comma-separated")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mlxclip-databench"),
                        help="where the generated data is kept and reused")
    parser.add_argument("--out", default="benchmarks/results/data")
    parser.add_argument("--batches", type=int, default=30, help="batches timed after the first")
    parser.add_argument("--skip-batches", type=int, default=250, help="batches skipped before the steady window")
    parser.add_argument("--steady-batches", type=int, default=313,
                        help="batches of the steady window (313 x 32: about one 10,000-sample shard); 0: none")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", choices=("clip", "stub"), default="clip")
    parser.add_argument("--decoded-cache", action="store_true",
                        help="keep the loader's decoded-image cache (default: off, decoded_cache_bytes=0)")
    parser.add_argument("--no-webdataset", action="store_true", help="skip open_clip's webdataset comparison")
    parser.add_argument("--profile", action="store_true", help="cProfile the first batch at the largest size")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        measure = measure_webdataset if spec["mode"] == "webdataset" else measure_loader
        print(json.dumps(measure(spec)))
        return
    sizes = [int(n.replace("_", "")) for n in args.sizes.split(",") if n.strip()]
    if not sizes or min(sizes) < BATCH_SIZE:
        parser.error(f"--sizes: every size must be at least the batch size ({BATCH_SIZE})")
    run(sizes, args.work, args.out, batches=args.batches, skip_batches=args.skip_batches,
        steady_batches=args.steady_batches, workers=args.workers, tokenizer=args.tokenizer,
        decoded_cache=args.decoded_cache, webdataset=not args.no_webdataset, profile=args.profile)


if __name__ == "__main__":
    main()
