"""`python -m mlx_clip.benchmarks.data` at tiny sizes: the data it generates is what the readers
expect, and the report holds a measured row for every format and size, the goal lines and the CPU."""

import json

import pytest

from mlx_clip.benchmarks import data as bench
from mlx_clip.benchmarks import data_make as make

SIZES = (200, 400)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    # The webdataset comparison is left out: importing open_clip_train (torchvision) alone takes
    # 10-20 s per fresh process on a CI runner.
    bench.main(["--sizes", ",".join(map(str, SIZES)), "--work", str(work), "--out", str(out), "--batches", "3",
                "--skip-batches", "1", "--steady-batches", "3", "--no-webdataset"])
    return work, out


def test_generated_data_reads_back_through_our_readers(report):
    from mlx_clip.data.records import load_dataset

    work, _ = report
    for fmt in make.FORMATS:
        for n in SIZES:
            samples = load_dataset(make.dataset_path(work, fmt, n)).samples
            assert len(samples) == n
            assert samples[n - 1].caption == make.caption(n - 1)
    shards = json.loads((make.dataset_path(work, "shards", 400) / "manifest.json").read_text())
    assert shards["format"] == "mlxclip-shards" and shards["samples"] == 400
    assert [s["samples"] for s in shards["shards"]] == [100] * make.MIN_SHARDS


def test_report_has_every_format_and_size_with_positive_numbers(report):
    from matplotlib.image import imread

    _, out = report
    results = json.loads((out / "data.json").read_text())
    rows = {(r["format"], r["samples"]): r for r in results["rows"]}
    assert set(rows) == {(fmt, n) for fmt in make.FORMATS for n in SIZES}
    for row in rows.values():
        assert "error" not in row, row
        for key in ("first_batch_s", "peak_rss_mb", "images_per_s", "steady_images_per_s", "load_dataset_s",
                    "next_batch_s"):
            assert row[key] > 0, (row["format"], row["samples"], key)
        assert row["samples_read"] == row["samples"]
    assert {g["goal"][:2] for g in results["goals"]} == {"(a", "(b", "(c"}
    assert all(isinstance(g["passed"], bool) for g in results["goals"])
    text = (out / "data.md").read_text()
    assert "| format | samples | first batch (s) | peak RSS (MB) | images/s |" in text
    assert results["cpu"]["model"] in text and f"{results['cpu']['cores']} cores" in text
    assert text.count("PASS ") + text.count("FAIL ") == len(results["goals"])
    assert imread(out / "data.png").shape[0] > 100


def test_reuses_data_with_the_same_parameters(report):
    work, _ = report
    assert make.prepare(work, list(SIZES), echo=lambda _: None)["generated"] == []
