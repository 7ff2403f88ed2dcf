"""The data loading benchmark's goals and report files: each goal line evaluated PASS/FAIL from
the measured rows (`goals`), and the results written as data.md (the tables, goals, how the data
was made and measured) and data.png (time to first batch and peak RSS against the sample count),
with the goal thresholds and the comparison row's name."""

from __future__ import annotations

from pathlib import Path

from mlx_clip.benchmarks.data_make import FORMATS, MIN_SHARDS

WDS_NAME = "webdataset (open_clip)"
GOAL_FIRST_BATCH_S = 3.0
GOAL_RSS_GROWTH_MB = 50.0
GOAL_MANIFEST_S, GOAL_MANIFEST_MB, GOAL_MANIFEST_ROWS = 10.0, 300.0, 1_000_000
GOAL_WDS_RATIO = 0.9


def _brief(row: dict) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    steady = f", steady {row['steady_images_per_s']:.0f}" if "steady_images_per_s" in row else ""
    return (f"first batch {row['first_batch_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"{row['images_per_s']:.0f} images/s{steady}")


def _ok(row: dict | None) -> bool:
    return row is not None and "error" not in row


def goals(rows: list[dict], comparison: list[dict], sizes: list[int]) -> list[dict]:
    """The issue's goal lines, each PASS/FAIL from the measured numbers (FAIL where a run failed)."""
    at = {(r["format"], r["samples"]): r for r in rows + comparison}
    small, large = min(sizes), max(sizes)
    lines = []

    def add(goal: str, passed: bool, detail: str) -> None:
        lines.append({"goal": goal, "passed": bool(passed), "detail": detail})

    for fmt in ("shards", "parquet"):
        measured = [at.get((fmt, n)) for n in sizes]
        if all(_ok(r) for r in measured):
            worst = max(measured, key=lambda r: r["first_batch_s"])
            add(f"(a) {fmt}: time to first batch <= {GOAL_FIRST_BATCH_S:g} s at every size",
                worst["first_batch_s"] <= GOAL_FIRST_BATCH_S,
                f"slowest {worst['first_batch_s']:.2f} s at {worst['samples']:,}")
            growth = at[(fmt, large)]["peak_rss_mb"] - at[(fmt, small)]["peak_rss_mb"]
            add(f"(a) {fmt}: peak RSS growth <= {GOAL_RSS_GROWTH_MB:g} MB from {small:,} to {large:,} samples",
                growth <= GOAL_RSS_GROWTH_MB,
                f"{at[(fmt, small)]['peak_rss_mb']:.0f} -> {at[(fmt, large)]['peak_rss_mb']:.0f} MB "
                f"({growth:+.0f} MB)")
        else:
            add(f"(a) {fmt}: first batch <= {GOAL_FIRST_BATCH_S:g} s and RSS growth <= {GOAL_RSS_GROWTH_MB:g} MB",
                False, "a run failed")
    manifest = at.get(("manifest", large))
    scale = "" if large == GOAL_MANIFEST_ROWS else f" (measured at {large:,} rows, the largest size run)"
    if _ok(manifest):
        add(f"(b) manifest: {GOAL_MANIFEST_ROWS:,} rows to the first batch in <= {GOAL_MANIFEST_S:g} s{scale}",
            manifest["first_batch_s"] <= GOAL_MANIFEST_S, f"{manifest['first_batch_s']:.2f} s")
        add(f"(b) manifest: {GOAL_MANIFEST_ROWS:,} rows with <= {GOAL_MANIFEST_MB:g} MB peak RSS{scale}",
            manifest["peak_rss_mb"] <= GOAL_MANIFEST_MB, f"{manifest['peak_rss_mb']:.0f} MB")
    else:
        add(f"(b) manifest: {GOAL_MANIFEST_ROWS:,} rows in <= {GOAL_MANIFEST_S:g} s, <= {GOAL_MANIFEST_MB:g} MB",
            False, "the run failed")
    metrics = [("images_per_s", "")]
    if any("steady_images_per_s" in r for r in rows):
        metrics.append(("steady_images_per_s", ", steady"))
    for key, tag in metrics:
        for fmt in ("shards", "parquet"):
            _ratio_goal(add, f"(c{tag}) {fmt} images/s >= manifest images/s (same images) at every size",
                        [(n, at.get((fmt, n)), at.get(("manifest", n))) for n in sizes], key, 1.0)
    for key, tag in metrics if comparison else ():
        for fmt in ("shards", "parquet"):
            _ratio_goal(add, f"(d{tag}) {fmt} images/s >= {GOAL_WDS_RATIO:g}x the webdataset pipeline's (open_clip) "
                        "at every size", [(n, at.get((fmt, n)), at.get((WDS_NAME, n))) for n in sizes], key,
                        GOAL_WDS_RATIO)
    return lines


def _ratio_goal(add, goal: str, pairs: list[tuple[int, dict | None, dict | None]], key: str, ratio: float) -> None:
    if not all(_ok(a) and _ok(b) and key in a and key in b for _, a, b in pairs):
        add(goal, False, "a run failed")
        return
    add(goal, all(a[key] >= ratio * b[key] for _, a, b in pairs),
        "; ".join(f"{n:,}: {a[key]:.0f} vs {b[key]:.0f} ({a[key] / b[key]:.2f}x)" for n, a, b in pairs))


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "—"


def write_markdown(results: dict, path: Path) -> str:
    s, sizes, cpu_info = results["settings"], results["sizes"], results["cpu"]
    tokenizer = ("OpenAI's CLIP BPE (`load_tokenizer()`, the built-in CLIP models' tokenizer)"
                 if s["tokenizer"] == "clip" else "a stub returning zeros (no tokenizer cost)")
    lines = [f"# Data loading — manifest, parquet, webdataset shards at {', '.join(f'{n:,}' for n in sizes)} samples",
             "", f"CPU: {cpu_info['model']}, {cpu_info['cores']} cores", "", results["machine_line"], "",
             f"Each mlxclip row is a fresh Python process: `load_dataset(path)` -> `BatchLoader(samples, "
             f"batch_size={s['batch_size']}, image_size={s['image_size']}, num_workers={s['workers']}, seed=0"
             f"{'' if s['decoded_cache'] else ', decoded_cache_bytes=0'})` -> "
             f"`next_batch()`. First batch: seconds from the start of `load_dataset` to the first batch (imports "
             f"before the clock). Peak RSS: the process's peak resident set (VmHWM; see below) after the first "
             f"batch and the {s['batches']} timed ones. Images/s: {s['batches']} batches after the first x "
             f"{s['batch_size']} / their seconds. Tokenizer: {tokenizer}." + ("" if s["decoded_cache"] else
             " The loader's cache of decoded images is off (`decoded_cache_bytes=0`; `--decoded-cache` keeps its "
             "256 MB default): the manifest's rows name only 10,000 distinct files, so with it on the manifest "
             "would be served from memory once those are decoded, which a manifest of a million files is not, and "
             "the 10,000-sample sets would be after their first epoch."),
             "", "| format | samples | first batch (s) | peak RSS (MB) | images/s |", "|---|---|---|---|---|"]
    for row in results["rows"] + results["comparison"]:
        if "error" in row:
            lines.append(f"| {row['format']} | {row['samples']:,} | failed: {row['error'][:80]} | | |")
        else:
            lines.append(f"| {row['format']} | {row['samples']:,} | {row['first_batch_s']:.2f} | "
                         f"{row['peak_rss_mb']:.0f} | {row['images_per_s']:.0f} |")
    lines += ["", "## Goals", ""]
    lines += [f"- {'PASS' if g['passed'] else 'FAIL'} {g['goal']}: {g['detail']}" for g in results["goals"]]
    steady = bool(s.get("steady_batches"))
    lines += ["", "## Where the first batch's time and memory go", "",
              "| format | samples | load_dataset (s) | BatchLoader (s) | next_batch (s) | RSS after imports (MB) | "
              "RSS after load_dataset (MB) | RSS at first batch (MB) | data on disk (MB) |"
              + (" steady images/s | RSS at the end (MB) |" if steady else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if steady else "")]
    for row in results["rows"] + results["comparison"]:
        if "error" in row:
            continue
        cells = [row["format"], f"{row['samples']:,}", _cell(row, "load_dataset_s", ".2f"),
                 _cell(row, "batch_loader_s", ".2f"), _cell(row, "next_batch_s", ".2f"),
                 f"{row['rss_after_imports_mb']:.0f}", _cell(row, "rss_after_load_dataset_mb", ".0f"),
                 f"{row['rss_first_batch_mb']:.0f}", _cell(row, "disk_mb", ".0f")]
        if steady:
            cells += [_cell(row, "steady_images_per_s", ".0f"), _cell(row, "final_peak_rss_mb", ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "RSS is VmHWM from /proc/self/status. `getrusage(RUSAGE_SELF).ru_maxrss` is not used: Linux "
              "carries over into it the high-water mark of the memory image that exec replaced, i.e. of the "
              "forked parent, so a fresh child of a large parent reports the parent's peak (ru_maxrss is kept "
              "in data.json as `ru_maxrss_mb`)."]
    if steady:
        lines += ["", f"Steady images/s: after the {s['batches']} timed batches, {s['skip_batches']} more are skipped, "
                  f"then {s['steady_batches']} timed ({s['steady_batches'] * s['batch_size']:,} samples; the default 313 "
                  "batches are about one 10,000-sample shard, so opening shards and row groups is paid in proportion; "
                  "webdataset's "
                  "shuffle buffer (initial 1000, up to 5000 per worker) reads two samples per sample it yields "
                  "until it is full, which the skipped batches cover). Where the data is smaller than all these "
                  "batches, the epoch rolls over inside the window, as in training."]
    shards = ", ".join(f"{n:,}: {per:,}" for n, per in s["shard_samples"].items())
    lines += ["", "## Data", "",
              f"- Every format holds the same images: sample i is JPEG i mod {s['pool_images']} of a pool of "
              f"{s['pool_images']} distinct random {s['image_size']}x{s['image_size']} JPEGs, caption "
              "\"a photo of item {i}\".",
              f"- manifest: a CSV (`image,caption`); its rows reference min(samples, {s['manifest_files']:,}) "
              f"distinct image files (row i names file i mod {s['manifest_files']:,}), not one file per row.",
              f"- parquet: {s['parquet_files']} files, row groups of {s['row_group']:,} rows, `image` as Hugging "
              "Face's image struct `{bytes, path}`.",
              f"- shards: tars written with `tarfile` plus mlxclip's `manifest.json`; samples per shard ({shards}): "
              f"10,000, but at least {MIN_SHARDS} shards so open_clip's {s['workers']} workers each get shards.",
              f"- generated or reused in `{s['work']}` "
              f"({results['generation']['seconds']:.0f} s generating this run: "
              f"{', '.join(results['generation']['generated']) or 'all reused'})."]
    if results["comparison"]:
        workers = [r["workers_ru_maxrss_mb"] for r in results["comparison"] if "workers_ru_maxrss_mb" in r]
        lines += ["", "## Comparison row", "",
                  f"`{WDS_NAME}`: open_clip_torch's `open_clip_train.data.get_wds_dataset(args, preprocess, "
                  f"is_train=True, epoch=0, tokenizer=the same tokenizer)` with train_data = the same shards (a brace "
                  f"pattern), train_num_samples = samples, batch_size={s['batch_size']}, workers={s['workers']}, "
                  "world_size=1, seed=0, not resampled; preprocess = `open_clip.image_transform"
                  f"({s['image_size']}, is_train=False)` (resize, center crop, normalise — the mlxclip rows do the "
                  "same, without augmentation). Its pipeline: SimpleShardList -> detshuffle2 -> split_by_node -> "
                  "split_by_worker -> tarfile_to_samples_nothrow -> shuffle(5000, initial=1000) -> select -> "
                  "decode('pilrgb') -> rename -> map_dict(preprocess, tokenize) -> to_tuple -> batched, in a "
                  f"`WebLoader` with {s['workers']} worker processes. First batch: from the call to "
                  "get_wds_dataset to the first batch (worker start-up and the 1000-sample shuffle warm-up "
                  "included). Peak RSS: the main process only (torch and torchvision imported: see RSS after "
                  "imports); its worker processes are not counted"
                  + (f" (their largest ru_maxrss, pages shared with the main process at fork included: "
                     f"{max(workers):.0f} MB)." if workers else ".")
                  + " Adjusted in that process only: open_clip_train.data imports pandas for its CSV dataset only "
                  "(where pandas is not installed an empty stand-in module takes its place), and its "
                  "`tarfile_to_samples_nothrow` is replaced by the same function with `tar_file_expander(..., "
                  "eof_value=None)` (the fix of open_clip#935 / webdataset#384): webdataset 1.0 ends each shard "
                  "with an `{}` marker that open_clip_train 3.3.0's `group_by_keys_nothrow` fails on "
                  "(`KeyError: 'fname'`), so the shipped pipeline does not run with the installed webdataset."]
    if results["profiles"]:
        lines += ["", f"## cProfile of load_dataset -> first batch at {max(sizes):,} samples", "",
                  "One more fresh process per format, with num_workers=0 so that the decodes, and the shard or row "
                  "group they open, run on the profiled thread (cProfile's overhead included in its seconds).", ""]
        for fmt, prof in results["profiles"].items():
            head = (f"{fmt}: first batch {prof['first_batch_s']:.2f} s under the profiler, "
                    f"load_dataset {prof['load_dataset_s']:.2f} s" if "error" not in prof else fmt)
            lines += [head, "", "```"] + (prof.get("profile") or [f"failed: {prof.get('error')}"]) + ["```", ""]
    gen = results["generation"]["seconds"]
    loads = [r["load_average_before"] for r in results["rows"] + results["comparison"]
             if r.get("load_average_before") is not None]
    if loads:
        lines += ["", f"1-minute load average just before each measurement: {min(loads):.2f} to {max(loads):.2f} "
                      f"(on {cpu_info['cores']} cores; other work on the machine shows in the figures)."]
    lines += ["", f"Wall time: {results['wall_s']:.0f} s ({gen:.0f} s of it generating data)."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_png(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.8), dpi=120)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2)
    measured = results["rows"] + results["comparison"]
    for fmt, style in zip((*FORMATS, WDS_NAME), ("o-", "s-", "d-", "^--")):
        points = sorted((r["samples"], r["first_batch_s"], r["peak_rss_mb"]) for r in measured
                        if r["format"] == fmt and "error" not in r)
        if not points:
            continue
        n, seconds, rss = zip(*points)
        panels[0].plot(n, seconds, style, label=fmt)
        panels[1].plot(n, rss, style, label=fmt)
    for axes, label in zip(panels, ("time to first batch (s)", "peak RSS (MB)")):
        axes.set_xscale("log")
        axes.set_xlabel("samples")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    cpu_info = results["cpu"]
    figure.suptitle(f"mlxclip data loading, batch {results['settings']['batch_size']}, "
                    f"{results['settings']['workers']} workers — {cpu_info['model']}, {cpu_info['cores']} cores",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path)

