"""Generating the data loading benchmark's synthetic datasets: the pool of small JPEGs and captions
every format shares, the captions manifest (CSV plus its image files), the parquet files and the
webdataset shards, written into a work folder beside a stamp of their parameters so that they are
reused while those match (`prepare`), with the constants that fix what is written."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMATS = ("manifest", "parquet", "shards")
IMAGE_SIZE = 32
POOL_IMAGES = 1000  # distinct JPEGs; sample i is image i mod POOL_IMAGES in every format
MANIFEST_FILES = 10_000  # distinct image files the manifest's rows name
SHARD_SAMPLES = 10_000
MIN_SHARDS = 4
PARQUET_FILES = 4
ROW_GROUP = 1000
GENERATOR_VERSION = 1  # bump when what is written changes: stale data is then written again
STAMP = ".databench.json"
# bytes per sample on disk, for the free-space check: tar headers and 512-byte padding dominate shards
BYTES_PER_SAMPLE = {"manifest": 60, "parquet": 1000, "shards": 2700}
MB = 2 ** 20


def caption(i: int) -> str:
    return f"a photo of item {i}"


def image_pool(count: int = POOL_IMAGES, size: int = IMAGE_SIZE, seed: int = 0) -> list[bytes]:
    """`count` distinct small JPEGs: a smooth random field (4x4 colours, upsampled) plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        field = np.asarray(low.resize((size, size), Image.Resampling.BILINEAR), np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        pool.append(buffer.getvalue())
    return pool


def _stamp(folder: Path, params: dict, name: str = STAMP) -> bool:
    try:
        return json.loads((folder / name).read_text()) == params
    except (OSError, ValueError):
        return False


def _fresh(folder: Path) -> None:
    """Remove what an earlier (other or interrupted) generation left in one of our folders."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def shard_samples(n: int) -> int:
    return min(SHARD_SAMPLES, math.ceil(n / MIN_SHARDS))


def _write_shard(path: Path, start: int, stop: int, pool: list[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, stop):
            key = f"{i:09d}"
            for ext, data in (("jpg", pool[i % len(pool)]), ("txt", caption(i).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def make_shards(folder: Path, n: int, pool: list[bytes], params: dict) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from mlx_clip.data.shards import MANIFEST, MANIFEST_FORMAT

    _fresh(folder)
    per = shard_samples(n)
    spans = [(k, start, min(start + per, n)) for k, start in enumerate(range(0, n, per))]
    with ProcessPoolExecutor(max(1, min(len(spans), os.cpu_count() or 1))) as pool_exec:
        for done in [pool_exec.submit(_write_shard, folder / f"{k:05d}.tar", a, b, pool) for k, a, b in spans]:
            done.result()
    manifest = {"format": MANIFEST_FORMAT, "version": 1,
                "shards": [{"file": f"{k:05d}.tar", "samples": b - a} for k, a, b in spans],
                "samples": n, "class_names": None}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (folder / STAMP).write_text(json.dumps(params))


def make_parquet(folder: Path, n: int, pool: list[bytes], params: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _fresh(folder)
    pictures = pa.array(pool, pa.binary())
    features = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    per = math.ceil(n / PARQUET_FILES)
    for k, start in enumerate(range(0, n, per)):
        rows = np.arange(start, min(start + per, n))
        image = pa.StructArray.from_arrays(
            [pictures.take(pa.array(rows % len(pool))), pa.array([f"{i:09d}.jpg" for i in rows], pa.string())],
            names=["bytes", "path"])
        table = pa.table({"image": image, "caption": pa.array([caption(i) for i in rows], pa.string())})
        table = table.replace_schema_metadata(metadata)
        pq.write_table(table, folder / f"part-{k:02d}.parquet", row_group_size=ROW_GROUP)
    (folder / STAMP).write_text(json.dumps(params))


def manifest_files(n: int) -> int:
    return min(n, MANIFEST_FILES)


def make_manifest_images(folder: Path, count: int, pool: list[bytes], params: dict) -> None:
    _fresh(folder)
    for j in range(count):
        (folder / f"{j:05d}.jpg").write_bytes(pool[j % len(pool)])
    (folder / STAMP).write_text(json.dumps(params))


def make_manifest(path: Path, n: int) -> None:
    files = manifest_files(n)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as out:
        out.write("image,caption\n")
        for start in range(0, n, 65536):
            out.write("".join(f"images/{i % files:05d}.jpg,{caption(i)}\n" for i in range(start, min(start + 65536, n))))
    os.replace(tmp, path)


def dataset_path(work: Path, fmt: str, n: int) -> Path:
    if fmt == "manifest":
        return work / "manifest" / f"captions-{n}.csv"
    return work / f"{fmt}-{n}"


def _params(fmt: str, n: int) -> dict:
    params = {"generator": GENERATOR_VERSION, "format": fmt, "samples": n, "pool": POOL_IMAGES,
              "image_px": IMAGE_SIZE}
    if fmt == "shards":
        params["shard_samples"] = shard_samples(n)
    if fmt == "parquet":
        params.update(files=PARQUET_FILES, row_group=ROW_GROUP)
    if fmt == "manifest":
        params["distinct_files"] = manifest_files(n)
    return params


def prepare(work: Path, sizes: list[int], echo: Callable[[str], None] = print) -> dict:
    """Generate what is missing or stale; returns {"seconds", "generated"}."""
    work.mkdir(parents=True, exist_ok=True)
    todo = [(fmt, n) for fmt in FORMATS for n in sizes if not _ready(work, fmt, n)]
    need = sum(BYTES_PER_SAMPLE[fmt] * n for fmt, n in todo)
    free = shutil.disk_usage(work).free
    if todo and free < need * 1.1 + 512 * MB:
        raise SystemExit(f"{work}: about {need / 2 ** 30:.1f} GiB needed for the data, {free / 2 ** 30:.1f} GiB "
                         "free; pass --work elsewhere or fewer --sizes")
    started, pool = time.perf_counter(), None
    images, files = work / "manifest" / "images", manifest_files(max(sizes))
    if _image_files(images) < files:  # never fewer than before: other sizes' manifests name them too
        pool = image_pool()
        echo(f"writing {files:,} image files for the manifests ...")
        make_manifest_images(images, files, pool, {**_image_params(), "files": files})
    for fmt, n in todo:
        pool = pool or image_pool()
        echo(f"[{time.perf_counter() - started:6.0f}s] writing {fmt}, {n:,} samples ...")
        target = dataset_path(work, fmt, n)
        if fmt == "manifest":
            make_manifest(target, n)
            (target.parent / f"{target.name}{STAMP}").write_text(json.dumps(_params(fmt, n)))
        elif fmt == "shards":
            make_shards(target, n, pool, _params(fmt, n))
        else:
            make_parquet(target, n, pool, _params(fmt, n))
    return {"seconds": time.perf_counter() - started, "generated": [f"{f} {n}" for f, n in todo]}


def _image_params() -> dict:
    return {"generator": GENERATOR_VERSION, "pool": POOL_IMAGES, "image_px": IMAGE_SIZE}


def _image_files(images: Path) -> int:
    """How many manifest image files `images` holds, as its stamp says (0: none, or stale)."""
    try:
        stamp = json.loads((images / STAMP).read_text())
    except (OSError, ValueError):
        return 0
    files = stamp.pop("files", 0)
    return files if stamp == _image_params() else 0


def _ready(work: Path, fmt: str, n: int) -> bool:
    target = dataset_path(work, fmt, n)
    if fmt == "manifest":
        return (_image_files(work / "manifest" / "images") >= manifest_files(n) and target.is_file()
                and _stamp(target.parent, _params(fmt, n), f"{target.name}{STAMP}"))
    return _stamp(target, _params(fmt, n))


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

