"""`mlxclip shard`: local datasets written as webdataset tar shards, read back both by the independent
`webdataset` package and by the toolkit's own reader, byte-identical run to run, never over the input."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from click.testing import CliRunner
from PIL import Image

from mlx_clip.cli import main
from mlx_clip.data import shard_writer
from mlx_clip.data.records import load_dataset
from mlx_clip.data.shard_writer import write_shards
from mlx_clip.data.shards import MANIFEST, MANIFEST_FORMAT
from mlx_clip.errors import ConfigError

CAPTIONS = [("a.png", "a red square"), ("a.png", "the same picture, said again"), ("b.jpg", "café au lait ☕"),
            ("c.png", "a grey, noisy thing")]


def picture(path: Path, seed: int, size: int = 8) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def captions_csv(tmp_path) -> Path:
    folder = tmp_path / "captions"
    for seed, name in enumerate(sorted({name for name, _ in CAPTIONS})):
        picture(folder / name, seed)
    lines = ["image,caption"] + [f'{name},"{caption}"' for name, caption in CAPTIONS]
    (folder / "captions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "captions.csv"


@pytest.fixture
def class_folders(tmp_path) -> Path:
    root = tmp_path / "classes"
    for seed, (name, count) in enumerate((("cat", 3), ("dog", 2), ("fish", 2))):
        for n in range(count):
            picture(root / name / f"{n}.png", 10 * seed + n)
    return root


def write(data, out, **options) -> dict:
    return write_shards(data, out, echo=lambda line: None, **options)


def read_with_webdataset(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(webdataset.WebDataset(urls, shardshuffle=False))


def expected_rows(data: Path) -> list[dict]:
    dataset = load_dataset(data)
    return [{"key": f"{row:09d}", "caption": s.caption, "label": s.label, "image": Path(s.image),
             "class_name": dataset.class_names[s.label] if dataset.class_names else None}
            for row, s in enumerate(dataset.samples)]


@pytest.mark.parametrize("layout", ["captions_csv", "class_folders"])
def test_the_webdataset_package_reads_back_every_sample(layout, request, tmp_path):
    data = request.getfixturevalue(layout)
    manifest = write(data, tmp_path / "shards")
    expected = expected_rows(data)
    read = read_with_webdataset(tmp_path / "shards")
    assert [r["__key__"] for r in read] == [e["key"] for e in expected]
    for got, want in zip(read, expected):
        extension = want["image"].suffix.lstrip(".")
        assert got[extension] == want["image"].read_bytes()
        assert got["txt"].decode("utf-8") == want["caption"]
        assert ("cls" in got) == (want["label"] is not None)
        if want["label"] is not None:
            assert int(got["cls"]) == want["label"]
        assert json.loads(got["json"]) == {"caption": want["caption"], "source": str(want["image"]),
                                           "label": want["label"], "class_name": want["class_name"]}
    assert manifest["format"] == MANIFEST_FORMAT and manifest["samples"] == len(expected)
    assert json.loads((tmp_path / "shards" / MANIFEST).read_text()) == manifest


@pytest.mark.parametrize("layout", ["captions_csv", "class_folders"])
def test_the_toolkit_reads_back_the_same_samples_in_order(layout, request, tmp_path):
    data = request.getfixturevalue(layout)
    manifest = write(data, tmp_path / "shards", samples_per_shard=3)
    source, written = load_dataset(data), load_dataset(tmp_path / "shards")
    assert len(written.samples) == manifest["samples"] == len(source.samples)
    assert written.class_names == source.class_names and written.kind == source.kind
    for got, want in zip(written.samples, source.samples):
        assert (got.caption, got.label) == (want.caption, want.label)
        assert got.image.read() == Path(want.image).read_bytes()


def test_samples_per_shard_splits_the_samples(class_folders, tmp_path):
    manifest = write(class_folders, tmp_path / "shards", samples_per_shard=3)
    assert [(s["file"], s["samples"]) for s in manifest["shards"]] == [
        ("shard-000000.tar", 3), ("shard-000001.tar", 3), ("shard-000002.tar", 1)]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [MANIFEST, *(s["file"] for s in manifest["shards"])]
    keys = [[r["__key__"] for r in read_with_webdataset_one(tmp_path / "shards" / s["file"])] for s in manifest["shards"]]
    assert keys == [["000000000", "000000001", "000000002"], ["000000003", "000000004", "000000005"], ["000000006"]]


def read_with_webdataset_one(shard: Path) -> list[dict]:
    return list(webdataset.WebDataset([str(shard)], shardshuffle=False))


def test_samples_per_shard_below_one_is_refused(class_folders, tmp_path):
    with pytest.raises(ConfigError, match="--samples-per-shard must be a positive integer"):
        write(class_folders, tmp_path / "shards", samples_per_shard=0)
    result = CliRunner().invoke(main, ["shard", str(class_folders), str(tmp_path / "shards"), "--samples-per-shard", "0"])
    assert result.exit_code == 2 and "error: --samples-per-shard must be a positive integer" in result.output
    assert not (tmp_path / "shards").exists()


def test_the_same_input_gives_byte_identical_shards(captions_csv, tmp_path):
    (captions_csv.parent / "c.png").write_bytes(b"junk")  # its reason in the manifest is the same each time
    write(captions_csv, tmp_path / "one", samples_per_shard=3)
    os.utime(captions_csv.parent / "a.png", (1, 1))  # a file's time is no part of the output
    write(captions_csv, tmp_path / "two", samples_per_shard=3)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def shard_cli(*args) -> object:
    return CliRunner().invoke(main, ["shard", *map(str, args)])


@pytest.mark.parametrize("where", ["inside", "same"])
def test_out_dir_overlapping_data_is_refused_even_with_overwrite(class_folders, where):
    out = class_folders / "shards" if where == "inside" else class_folders
    before = sorted(class_folders.rglob("*"))
    for extra in ([], ["--overwrite"]):
        result = shard_cli(class_folders, out, *extra)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: OUT_DIR") and str(out) in result.output
    assert sorted(class_folders.rglob("*")) == before


def test_out_dir_holding_data_is_refused(class_folders):
    result = shard_cli(class_folders / "cat", class_folders.parent, "--overwrite")
    assert result.exit_code == 2 and f"OUT_DIR {class_folders.parent} contains DATA" in result.output


def test_a_non_empty_out_dir_is_replaced_only_with_overwrite(captions_csv, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = shard_cli(captions_csv, out)
    assert result.exit_code == 2 and f"error: OUT_DIR {out}: folder is not empty" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = shard_cli(captions_csv, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"wrote {len(CAPTIONS)} samples in 1 shard(s), skipped 0: {out}" in result.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-000000.tar"]
    assert not list(tmp_path.glob("shards.*"))  # no staging or replaced folder left beside it


def test_an_unreadable_image_is_counted_listed_and_skipped(captions_csv, tmp_path):
    (captions_csv.parent / "b.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "shards"
    result = shard_cli(captions_csv, out)
    assert result.exit_code == 0, result.output
    bad = str(captions_csv.parent / "b.jpg")
    assert f"wrote {len(CAPTIONS) - 1} samples in 1 shard(s), skipped 1: {out}" in result.output
    assert f"skipped {bad}: not a readable image" in result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s[0] for s in manifest["skipped"]] == [bad] and manifest["samples"] == len(CAPTIONS) - 1
    # Keys name the row they came from: the skipped row leaves a gap.
    assert [r["__key__"] for r in read_with_webdataset(out)] == ["000000000", "000000001", "000000003"]
    assert [s.caption for s in load_dataset(out).samples] == [CAPTIONS[i][1] for i in (0, 1, 3)]


def test_an_interrupted_run_leaves_no_out_dir(class_folders, tmp_path, monkeypatch):
    written = []

    def add_then_stop(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(args)
        return add_sample(*args, **kwargs)

    add_sample = shard_writer._add_sample
    monkeypatch.setattr(shard_writer, "_add_sample", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        write(class_folders, tmp_path / "shards", samples_per_shard=1)
    assert list(tmp_path.iterdir()) == [class_folders]


def test_train_and_val_folders_give_train_unless_split_val(tmp_path):
    root = tmp_path / "split"
    for part, seeds in (("train", (0, 1)), ("val", (2,))):
        for name in ("cat", "dog"):
            for seed in seeds:
                picture(root / part / name / f"{seed}.png", seed + (10 if name == "dog" else 0))
    train = write(root, tmp_path / "train")
    val = write(root, tmp_path / "val", split="val")
    assert (train["samples"], val["samples"]) == (4, 2)
    assert train["class_names"] == val["class_names"] == ["cat", "dog"]
    sources = [json.loads(r["json"])["source"] for r in read_with_webdataset(tmp_path / "val")]
    assert sources == [str(root / "val" / "cat" / "2.png"), str(root / "val" / "dog" / "2.png")]
    with pytest.raises(ConfigError, match="--split must be train or val"):
        write(root, tmp_path / "test", split="test")


def test_parquet_images_keep_their_bytes_under_the_sniffed_extension(tmp_path):
    images = {"png": picture(tmp_path / "p.png", 1).read_bytes()}
    buffer = io.BytesIO()
    Image.open(io.BytesIO(images["png"])).convert("RGB").save(buffer, format="JPEG")
    images["jpg"] = buffer.getvalue()
    table = pa.table({"image": [{"bytes": images["png"], "path": None}, {"bytes": images["jpg"], "path": None}],
                      "caption": ["a png", "a jpeg"]})
    pq.write_table(table, tmp_path / "data.parquet")
    write(tmp_path / "data.parquet", tmp_path / "shards")
    read = read_with_webdataset(tmp_path / "shards")
    assert [(r["png"] if "png" in r else r["jpg"]) for r in read] == [images["png"], images["jpg"]]
    assert [r["txt"].decode() for r in read] == ["a png", "a jpeg"]


def test_a_format_the_reader_does_not_take_is_stored_as_lossless_png(tmp_path):
    root = tmp_path / "classes"
    picture(root / "cat" / "0.bmp", 0)
    picture(root / "dog" / "0.png", 1)
    write(root, tmp_path / "shards")
    read = read_with_webdataset(tmp_path / "shards")
    assert "bmp" not in read[0] and np.array_equal(pixels_of(read[0]["png"]),
                                                   pixels_of((root / "cat" / "0.bmp").read_bytes()))
    assert len(load_dataset(tmp_path / "shards").samples) == 2
