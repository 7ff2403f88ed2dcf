"""Data read where it lies: webdataset tar shards and parquet (also from a Hugging Face cache).

The shards here are written with `tarfile` in webdataset's layout and read back against the
`webdataset` package itself; parquet files are written by pyarrow in Hugging Face's image-struct
layout. Training on them is checked the way the captions path is: both engines train, a run stopped
by SIGINT resumes bit-identical, and two processes equal one.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import io
import json
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlx_clip.data.loader import BatchLoader
from mlx_clip.data.order import SeededOrder
from mlx_clip.data.records import load_dataset
from mlx_clip.data.shards import MANIFEST, MANIFEST_FORMAT
from mlx_clip.errors import DataError
from tests.train_helpers import assert_same_weights, final_weights, run, small_config

CLASSES = ["circle", "square"]


def _png(seed: int, size: int = 24) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder, shards: int = 3, per_shard: int = 8, manifest: bool = True, json_captions: bool = False):
    """Shards of `per_shard` samples: an image, a caption (txt, or json) and a class each."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as archive:
            for k in range(per_shard):
                i = s * per_shard + k
                key = f"{i:09d}"
                _member(archive, f"{key}.png", _png(i))
                caption = f"a photo of a {CLASSES[i % 2]} number {i}"
                if json_captions:
                    _member(archive, f"{key}.json", json.dumps({"caption": caption, "other": 1}).encode())
                else:
                    _member(archive, f"{key}.txt", caption.encode())
                _member(archive, f"{key}.cls", str(i % 2).encode())
        entries.append({"file": name, "samples": per_shard})
    if manifest:
        (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "shards": entries,
                                                   "samples": shards * per_shard, "class_names": CLASSES}))
    return folder


def write_parquet(path, rows: int = 24, row_group: int = 8):
    records = [{"image": {"bytes": _png(i), "path": f"{i}.png"}, "caption": f"a photo of a {CLASSES[i % 2]} {i}",
                "label": i % 2} for i in range(rows)]
    features = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"},
                "label": {"names": CLASSES, "_type": "ClassLabel"}}
    table = pa.Table.from_pylist(records).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    return path


def _loader(samples, **kwargs):
    return BatchLoader(samples, batch_size=4, image_size=16, seed=3, num_workers=1,
                       tokenize=lambda texts: np.zeros((len(texts), 8), np.int64), **kwargs)


# ---- reading --------------------------------------------------------------------------------


@pytest.mark.parametrize("json_captions", [False, True])
def test_shards_read_as_webdataset_reads_them(tmp_path, json_captions):
    import webdataset

    folder = write_shards(tmp_path / "shards", json_captions=json_captions)
    data = load_dataset(str(tmp_path / "shards" / "shard-{000000..000002}.tar"))
    assert data.kind == "class_folders" and data.class_names == CLASSES and len(data.samples) == 24
    reference = list(webdataset.WebDataset([str(p) for p in sorted(folder.glob("*.tar"))], shardshuffle=False))
    assert len(reference) == len(data.samples)
    for sample, expected in zip(data.samples, reference, strict=True):
        caption = json.loads(expected["json"])["caption"] if json_captions else expected["txt"].decode()
        assert sample.image.read() == expected["png"]
        assert sample.caption == caption and sample.label == int(expected["cls"])
        assert str(sample.image).endswith(expected["__key__"])


def test_parquet_rows_and_hugging_face_class_names(tmp_path):
    write_parquet(tmp_path / "d.parquet", rows=20, row_group=8)
    data = load_dataset(str(tmp_path / "d.parquet"))
    assert data.class_names == CLASSES and data.samples.shard_sizes.tolist() == [8, 8, 4]
    rows = pq.read_table(tmp_path / "d.parquet").to_pylist()
    for sample, row in zip(data.samples, rows, strict=True):
        assert sample.image.read() == row["image"]["bytes"]
        assert (sample.caption, sample.label) == (row["caption"], row["label"])


def test_parquet_classes_without_captions_are_captioned_from_templates(tmp_path):
    """An image-classification dataset (image + ClassLabel, as most on the hub are): prompts made
    from templates and the class name, as for class folders."""
    path = write_parquet(tmp_path / "d.parquet", rows=10, row_group=4)
    pq.write_table(pq.read_table(path).drop_columns(["caption"]), path, row_group_size=4)
    data = load_dataset(str(path), templates=["a {} shape.", "art of a {}."])
    assert data.kind == "class_folders" and data.templates == ["a {} shape.", "art of a {}."]
    for i, sample in enumerate(data.samples):
        assert sample.caption in (f"a {CLASSES[i % 2]} shape.", f"art of a {CLASSES[i % 2]}.")
    assert len({s.caption for s in data.samples}) > 2  # the template is drawn per row


def hub_dataset(tmp_path, monkeypatch, train_rows: int = 16) -> str:
    """`org/photos` in a Hugging Face cache laid out as huggingface_hub lays it out, offline."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / repo_folder_name(repo_id="org/photos", repo_type="dataset")
    write_parquet(storage / "snapshots" / commit / "data" / "train-00000-of-00001.parquet", rows=train_rows,
                  row_group=12)
    write_parquet(storage / "snapshots" / commit / "data" / "test-00000-of-00001.parquet", rows=6)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(tmp_path / "hub"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return "hf:org/photos"


def test_a_hugging_face_dataset_from_the_local_cache(tmp_path, monkeypatch):
    hub_dataset(tmp_path, monkeypatch)
    assert len(load_dataset("hf:org/photos").samples) == 16
    assert len(load_dataset("hf:org/photos", split="test").samples) == 6
    with pytest.raises(DataError, match="hf:org/absent: not in the local Hugging Face cache"):
        load_dataset("hf:org/absent")
    with pytest.raises(DataError, match="no parquet files for split 'validation'"):
        load_dataset("hf:org/photos", split="validation")


def test_the_order_is_shard_by_shard_and_a_pure_function_of_seed_and_epoch():
    sizes = np.array([5, 3, 7])
    order = SeededOrder(15, seed=4, shard_sizes=sizes)
    starts = np.array([0, 5, 8, 15])
    for epoch in (0, 1):
        visited = order.epoch(epoch)
        assert sorted(visited.tolist()) == list(range(15))
        shard_of = np.searchsorted(starts, visited, side="right") - 1
        # one shard at a time: each shard's samples are contiguous in the epoch's order
        assert (np.diff(shard_of) != 0).sum() == 2
        np.testing.assert_array_equal(SeededOrder(15, seed=4, shard_sizes=sizes).epoch(epoch), visited)
    assert order.epoch(0).tolist() != order.epoch(1).tolist()


def test_a_truncated_shard_and_a_corrupt_row_group_are_counted_not_fatal(tmp_path):
    folder = write_shards(tmp_path / "shards", shards=2, per_shard=8)
    last = folder / "shard-000001.tar"
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])  # cut in the middle of a member
    with _loader(load_dataset(str(folder)).samples, max_bad_fraction=0.5) as loader:
        batches = list(loader)
        bad = loader.bad_files
    assert bad and all(path.startswith("shard-000001.tar") for path, _ in bad)
    assert 1 <= len(bad) < 8  # the first half of the shard still reads
    assert sum(len(b.indices) for b in batches) == 4 * ((16 - len(bad)) // 4)  # drop_last: whole batches

    path = write_parquet(tmp_path / "d.parquet", rows=24, row_group=8)
    group = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    start = group.data_page_offset
    raw[start:start + 64] = b"\xff" * 64  # the middle row group's image pages
    path.write_bytes(bytes(raw))
    with _loader(load_dataset(str(path)).samples, max_bad_fraction=0.5) as loader:
        seen = {int(i) for b in loader for i in b.indices}
        bad = loader.bad_files
    assert len(bad) == 8 and all("d.parquet#1" in where and "cannot be read" in reason for where, reason in bad)
    assert seen == set(range(8)) | set(range(16, 24))


def test_one_shard_holds_nothing_out_and_says_so(tmp_path):
    from mlx_clip.finetune import held_out_note, prepare_data

    cfg = small_config(tmp_path / "run", "mlx", data=str(write_shards(tmp_path / "one", shards=1)), val_fraction=0.2)
    data = prepare_data(cfg)
    assert len(data.val) == 0 and len(data.train) == 8
    assert "whole shards" in held_out_note(data, cfg)
    two = small_config(tmp_path / "run", "mlx", data=str(write_shards(tmp_path / "two", shards=3)), val_fraction=0.2)
    split = prepare_data(two)
    assert (len(split.train), len(split.val)) == (16, 8)  # round(0.2 x 3 shards) = 1 shard held out


def test_a_shard_that_is_not_a_tar_is_one_error_naming_it(tmp_path):
    folder = write_shards(tmp_path / "shards", shards=2)
    (folder / "shard-000000.tar").write_bytes(b"this is not a tar file" * 100)
    with _loader(load_dataset(str(folder)).samples) as loader, pytest.raises(DataError, match="shard-000000.tar"):
        list(loader)


# ---- training ---------------------------------------------------------------------------------


def _data(tmp_path, kind: str, monkeypatch=None) -> str:
    if kind == "shards":
        return str(write_shards(tmp_path / "shards", shards=4, per_shard=12))
    if kind == "hf":
        return hub_dataset(tmp_path, monkeypatch, train_rows=48)
    return str(write_parquet(tmp_path / "data.parquet", rows=48, row_group=12))


@pytest.mark.parametrize("kind", ["shards", "parquet", "hf"])
def test_both_engines_train_on_streamed_data_alike(tmp_path, kind, monkeypatch):
    data = _data(tmp_path, kind, monkeypatch)
    losses = {}
    for engine in ("mlx", "torch"):
        out = tmp_path / engine
        run(small_config(out, engine, data=data, steps=6, val_fraction=0.25))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[engine] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["mlx"]) == 6
    # Engine parity on the demo data is ~5e-7 over 50 steps (tests/test_grad_parity.py); 1e-5 relative.
    np.testing.assert_allclose(losses["mlx"], losses["torch"], rtol=1e-5)


def test_eval_scores_shards_and_parquet(tmp_path):
    from click.testing import CliRunner

    from mlx_clip.cli import main

    shards, parquet = _data(tmp_path, "shards"), _data(tmp_path, "parquet")
    result = CliRunner().invoke(main, ["eval", "--model", "tiny", "--data", shards, "--data", parquet,
                                       "--tasks", "zero_shot", "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "eval.json").read_text())
    results = scored if isinstance(scored, list) else scored.get("results", scored)
    assert len(results) == 2
    for entry in results:
        assert 0.0 <= entry["metrics"]["acc1"] <= 1.0


def _cli(out, data, *extra):
    return [sys.executable, "-m", "mlx_clip", "finetune", "--backend", "mlx", "--model", "tiny", "--steps", "30",
            "--batch-size", "8", "--warmup-steps", "2", "--out", str(out), "--save-every", "3", "--log-every", "1",
            "--num-workers", "1", "--no-evaluate", "--data", data, "--val-fraction", "0", *extra]


def _logged(out) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "parquet"])
def test_sigint_mid_epoch_then_resume_is_bit_identical(tmp_path, kind):
    data = _data(tmp_path, kind)
    reference = tmp_path / "reference"
    subprocess.run(_cli(reference, data), check=True, capture_output=True, timeout=300)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cli(out, data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while _logged(out) < 8 and time.time() < deadline and proc.poll() is None:  # 6 batches an epoch
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted at step" in output, output
    assert 8 <= _logged(out) < 30
    resumed = subprocess.run(_cli(out, data, "--resume", "latest"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(out), final_weights(reference))


@pytest.mark.slow
def test_two_processes_on_shards_train_as_one(tmp_path):
    from tests.test_distributed import finetune_args, losses, one_process, two_processes, weights

    data = _data(tmp_path, "shards")
    args = ("--data", data, "--val-fraction", "0")
    one_process(finetune_args("mlx", tmp_path / "one", *args))
    two_processes("mlx", finetune_args("mlx", tmp_path / "two", *args))
    assert losses(tmp_path / "one") == losses(tmp_path / "two")
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
