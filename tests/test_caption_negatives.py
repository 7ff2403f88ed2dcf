"""Hard-negative captions (`--negative-column`, NegCLIP) from the file to the update: reading them from
CSV/TSV/JSONL, the batch's fixed slots, each engine's first-step loss against the float64 definition
of `test_caption_negatives_loss` on the engine's own embeddings, engine parity, feature caching,
exact resume, the data fingerprint and the CLI's refusals.

The data are the built-in demo's captions with NegCLIP-style swaps written in the test: the colour
word swapped for another (every row) and the shape word (two rows in three), so rows have one or
two negatives."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_clip.api import resolve
from mlx_clip.data.captions import read_captions
from mlx_clip.data.demo import make_demo
from mlx_clip.data.loader import BatchLoader
from mlx_clip.data.records import load_dataset
from mlx_clip.engine.protocol import load_backend
from mlx_clip.errors import ConfigError, DataError, MlxClipError
from mlx_clip.finetune import Interrupted
from mlx_clip.model.builtin import cache_root
from mlx_clip.model.tokenizer import load_tokenizer
from mlx_clip.training.options import TrainConfig
from tests.test_caption_negatives_loss import _np_clip, _np_siglip
from tests.train_helpers import assert_same_weights, final_weights, run, small_config

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
MLXCLIP = str(Path(sys.executable).parent / "mlxclip")


def swapped(caption: str, words: tuple[str, ...], shift: int) -> str:
    """The caption with its word from `words` replaced by another of them."""
    out = caption.split()
    at = next(i for i, word in enumerate(out) if word in words)
    out[at] = words[(words.index(out[at]) + shift) % len(words)]
    return " ".join(out)


@pytest.fixture(scope="module")
def negatives_csv(tmp_path_factory) -> Path:
    target = make_demo(cache_root() / "demo")["target"]
    rows = list(csv.DictReader((target / "captions_train.csv").open()))
    path = tmp_path_factory.mktemp("negatives") / "pairs.csv"
    with path.open("w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["image", "caption", "wrong_colour", "wrong_shape"])
        for i, row in enumerate(rows):
            out.writerow([str(target / row["image"]), row["caption"], swapped(row["caption"], COLOURS, 1 + i % 3),
                          swapped(row["caption"], SHAPES, 1 + i % 2) if i % 3 else ""])
    return path


NEGATIVES = "wrong_colour,wrong_shape"


def negative_config(out, engine: str, data: Path, **overrides) -> TrainConfig:
    return small_config(out, engine, data=str(data), negative_column=NEGATIVES, val_fraction=0.0, **overrides)


# ---------------------------------------------------------------- reading


def test_csv_cells_become_each_rows_list_empty_cells_left_out(negatives_csv):
    table = read_captions(negatives_csv, negative_column=NEGATIVES)
    rows = list(csv.DictReader(negatives_csv.open()))
    assert len(table) == len(rows) == 960
    assert table.max_negatives == 2
    for i in (0, 1, 2, 3, 959):
        expected = tuple(text for text in (rows[i]["wrong_colour"], rows[i]["wrong_shape"]) if text)
        assert table[i].negatives == expected
        assert table[i].caption == rows[i]["caption"]
    assert table.negative_counts().sum() == 960 + 640
    # Without the option the same file reads as before.
    assert read_captions(negatives_csv).negatives is None


def test_the_python_reader_gives_what_the_fast_one_gives(tmp_path):
    """A file with a blank line goes through the row-by-row reader; the lists must be the same."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    text = "image,caption,neg1,neg2\na.png,a  red circle, a blue   circle ,\nb.png,x,,y\n"
    (tmp_path / "fast.csv").write_text(text)
    (tmp_path / "slow.csv").write_text(text.replace("\nb.png", "\n\nb.png"))
    fast, slow = (read_captions(tmp_path / f, negative_column="neg1,neg2") for f in ("fast.csv", "slow.csv"))
    assert [s.negatives for s in fast] == [s.negatives for s in slow] == [("a blue circle",), ("y",)]


def test_jsonl_keys_hold_a_string_a_list_or_nothing(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    rows = [{"image": "a.png", "caption": ["p", "q"], "neg": ["n1", " n2 "]}, {"image": "b.png", "caption": "r"},
            {"image": "c.png", "caption": "s", "neg": None}, {"image": "c.png", "caption": "t", "NEG": "n3"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    table = read_captions(tmp_path / "pairs.jsonl", negative_column="neg")
    assert [s.negatives for s in table] == [("n1", "n2"), ("n1", "n2"), (), (), ("n3",)]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "caption": "p", "neg": [1]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'neg' \(--negative-column\) must be a string or a list"):
        read_captions(tmp_path / "bad.jsonl", negative_column="neg")


def test_a_missing_or_empty_column_is_named(negatives_csv, tmp_path):
    with pytest.raises(DataError, match="no hard-negative caption column named 'wrong_size'; columns found: 'image', "
                                        "'caption', 'wrong_colour', 'wrong_shape'"):
        read_captions(negatives_csv, negative_column="wrong_colour,wrong_size")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "empty.csv").write_text("image,caption,neg\na.png,x,\n")
    with pytest.raises(DataError, match=r"empty.csv: no row has a hard-negative caption in 'neg'"):
        read_captions(tmp_path / "empty.csv", negative_column="neg")
    with pytest.raises(DataError, match="an empty column name"):
        read_captions(negatives_csv, negative_column="wrong_colour,")


def test_class_folders_are_refused(tmp_path):
    target = make_demo(cache_root() / "demo")["target_train"]
    with pytest.raises(DataError, match="class folders have no captions to hold hard negatives"):
        load_dataset(target, negative_column="neg")


def test_tar_shards_read_them_from_each_samples_json(tmp_path):
    """webdataset samples: `key.png` and `key.json` holding the caption and a string, a list or no
    negatives; a field of another type makes the sample a counted bad one."""
    import io
    import tarfile

    from mlx_clip.errors import ImageError
    from tests.test_streamed_data import _png

    records = [{"caption": "a red circle", "neg": "a blue circle"}, {"caption": "a green square"},
               {"caption": "a dot", "neg": ["two dots", " three  dots "], "other": "x"},
               {"caption": "a line", "neg": 7}]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as archive:
        for i, record in enumerate(records):
            for name, data in ((f"{i:05d}.png", _png(i)), (f"{i:05d}.json", json.dumps(record).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    samples = load_dataset(tmp_path / "shards", negative_column="neg").samples
    assert samples.reads_negatives
    assert [samples[i].negatives for i in range(3)] == [("a blue circle",), (), ("two dots", "three dots")]
    with pytest.raises(ImageError, match=r"'neg' \(--negative-column\) holds int, not captions"):
        samples[3].image.read()
    assert load_dataset(tmp_path / "shards").samples[2].negatives == ()


def _parquet_of(negatives_csv: Path, path: Path, rows: int = 64) -> Path:
    """The first `rows` pairs as parquet: the image path, the caption, the colour swap as a string
    and the shape swap in a list (null where the CSV cell is empty), row groups of 16."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = list(csv.DictReader(negatives_csv.open()))[:rows]
    table = pa.table({"image": [r["image"] for r in records], "caption": [r["caption"] for r in records],
                      "wrong_colour": [r["wrong_colour"] for r in records],
                      "wrong_shape": [[r["wrong_shape"]] if r["wrong_shape"] else None for r in records]})
    pq.write_table(table, path, row_group_size=16)
    return path


def test_parquet_string_and_list_columns(negatives_csv, tmp_path):
    from mlx_clip.data.collate import collate

    path = _parquet_of(negatives_csv, tmp_path / "pairs.parquet")
    rows = read_captions(negatives_csv, negative_column=NEGATIVES)
    streamed = load_dataset(path, negative_column=NEGATIVES).samples
    assert [s.negatives for s in streamed] == [rows[i].negatives for i in range(64)]
    # Not counted ahead: a batch gets the slots of its row with the most.
    tokenize = load_tokenizer(resolve("tiny")).encode
    pixels = [np.zeros((4, 4, 3), np.float32)] * 3
    one_each = collate(streamed, [0, 3, 6], pixels, tokenize, multi_positive=True)  # rows 0, 3, 6: colour only
    assert one_each.negative_mask.tolist() == [[True]] * 3
    mixed = collate(streamed, [0, 1], pixels[:2], tokenize, multi_positive=True)
    assert mixed.negative_mask.tolist() == [[True, False], [True, True]]
    with pytest.raises(DataError, match=r"no hard-negative caption column named 'wrong_size' \(--negative-column\)"):
        load_dataset(path, negative_column="wrong_colour,wrong_size")


def test_a_parquet_cell_of_another_type_makes_its_row_a_counted_bad_sample(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlx_clip.errors import ImageError

    (tmp_path / "a.png").write_bytes(b"x")
    pq.write_table(pa.table({"image": ["a.png", "a.png"], "caption": ["p", "q"], "neg": [[1, 2], [3]]}),
                   tmp_path / "bad.parquet")
    samples = load_dataset(tmp_path / "bad.parquet", negative_column="neg").samples
    with pytest.raises(ImageError, match=r"bad.parquet#0:row 0: 'neg' \(--negative-column\) holds list, not captions"):
        samples[0].image.read()


def test_a_parquet_run_trains_in_both_engines_alike(negatives_csv, tmp_path):
    """Streamed data give each batch its own slot count; both engines still agree (relative 5e-6,
    as for the captions file)."""
    path = _parquet_of(negatives_csv, tmp_path / "pairs.parquet", rows=128)
    losses = {engine: run(negative_config(tmp_path / engine, engine, path, steps=4, save_every=0)).train.losses
              for engine in ("mlx", "torch")}
    np.testing.assert_allclose(losses["mlx"], losses["torch"], rtol=5e-6)


# ---------------------------------------------------------------- the batch


def _batch(negatives_csv, model: str, image_size: int = 32):
    tokenizer = load_tokenizer(resolve(model))
    samples = read_captions(negatives_csv, negative_column=NEGATIVES)
    loader = BatchLoader(samples, batch_size=8, image_size=image_size,
                         tokenize=lambda t: tokenizer.trim(tokenizer.encode(t)), seed=0, num_workers=0)
    return samples, loader.next_batch(), tokenizer


def test_each_row_has_its_negatives_in_fixed_slots_and_empty_ones_masked(negatives_csv):
    samples, batch, tokenizer = _batch(negatives_csv, "tiny")
    rows = [samples[int(i)] for i in batch.indices]
    assert batch.negative_ids.shape[:2] == batch.negative_mask.shape == (8, 2)
    assert batch.negative_mask.tolist() == [[True, bool(s.negatives[1:])] for s in rows]
    for row, sample in enumerate(rows):
        texts = list(sample.negatives) + [""] * (2 - len(sample.negatives))
        expected = tokenizer.encode(texts)[:, :batch.negative_ids.shape[-1]]
        np.testing.assert_array_equal(batch.negative_ids[row], expected)


# ---------------------------------------------------------------- the engines


@pytest.mark.parametrize("engine_name", ["mlx", "torch"])
@pytest.mark.parametrize("model,reference", [("tiny", "clip"), ("siglip-tiny", "siglip")])
def test_first_step_loss_is_the_definition_on_the_engines_embeddings(negatives_csv, engine_name, model, reference):
    """The loss a training step reports equals the float64 definition (the loss tests' own) on the
    embeddings the engine gives the batch's pixels, captions and negatives before the update:
    relative 1e-6 (measured at most 9.4e-8 here, float32 towers against float64)."""
    folder = resolve(model)
    before = load_backend(engine_name, folder)
    _, batch, _ = _batch(negatives_csv, model, before.config.vision_config.image_size)
    image = before.encode_images(batch.pixels)
    text = before.encode_texts(batch.input_ids)
    rows, slots, length = batch.negative_ids.shape
    negatives = before.encode_texts(batch.negative_ids.reshape(rows * slots, length)).reshape(rows, slots, -1)
    engine = load_backend(engine_name, folder)
    cfg = TrainConfig(model=str(folder), backend=engine_name, batch_size=8, lr=1e-5, warmup_steps=0,
                      negative_column=NEGATIVES)
    engine.prepare_training(cfg)
    reported = engine.train_step(batch, 1e-5)["loss"]
    tensors = load_file(str(folder / "model.safetensors"))
    scale = float(np.exp(tensors["logit_scale"].astype(np.float64)).reshape(()))
    bias = float(tensors["logit_bias"].reshape(())) if "logit_bias" in tensors else None
    case = {"image": image, "text": text, "negatives": negatives, "mask": batch.negative_mask}
    labels = batch.positive_ids
    expected = _np_clip(case, scale, labels=labels) if reference == "clip" else _np_siglip(case, scale, bias, labels)
    assert reported == pytest.approx(expected, rel=1e-6)


def test_engines_agree_and_negatives_change_the_run(negatives_csv, tmp_path):
    """10 steps: the same losses in both engines (relative 5e-6; measured 4.3e-7), not those without."""
    losses = {engine: run(negative_config(tmp_path / engine, engine, negatives_csv, save_every=0)).train.losses
              for engine in ("mlx", "torch")}
    plain = run(small_config(tmp_path / "plain", "mlx", data=str(negatives_csv), val_fraction=0.0,
                             save_every=0)).train.losses
    np.testing.assert_allclose(losses["mlx"], losses["torch"], rtol=5e-6)
    assert losses["mlx"][0] > plain[0] + 0.05  # more candidates in each image's softmax


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_micro_batches_equal_the_whole_batch(negatives_csv, tmp_path, engine):
    """Feature caching embeds the negatives chunk by chunk with their rows: the same update up to
    float32 summation order (relative 1.7e-7 measured on the losses, 0 in torch; 2e-6 allowed)."""
    whole = run(negative_config(tmp_path / "whole", engine, negatives_csv, steps=4, save_every=0)).train.losses
    cached = run(negative_config(tmp_path / "cached", engine, negatives_csv, steps=4, save_every=0,
                                 micro_batch_size=4)).train.losses
    np.testing.assert_allclose(cached, whole, rtol=2e-6)


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_resume_is_bit_identical(negatives_csv, tmp_path, engine):
    whole = run(negative_config(tmp_path / "whole", engine, negatives_csv, steps=8, save_every=4))
    with pytest.raises(Interrupted):
        run(negative_config(tmp_path / "cut", engine, negatives_csv, steps=8, save_every=4), stop_after=4)
    resumed = run(negative_config(tmp_path / "cut", engine, negatives_csv, steps=8, save_every=4, resume="latest"))
    assert resumed.train.losses == whole.train.losses[4:]
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"))


def test_resume_with_other_negatives_is_refused_naming_them(negatives_csv, tmp_path):
    run(negative_config(tmp_path / "run", "mlx", negatives_csv, steps=4, save_every=2))
    changed = tmp_path / "changed.csv"
    rows = list(csv.reader(negatives_csv.open()))
    rows[5][2] = "a purple square"
    with changed.open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    with pytest.raises(MlxClipError, match=r"training hard-negative captions \(--negative-column\) differ"):
        run(negative_config(tmp_path / "run", "mlx", changed, steps=4, save_every=2, resume="latest"))



def test_the_start_record_and_the_cli(negatives_csv, tmp_path):
    done = subprocess.run([MLXCLIP, "finetune", "--backend", "mlx", "--model", "tiny", "--steps", "2", "--batch-size",
                           "8", "--warmup-steps", "0", "--out", str(tmp_path / "run"), "--data", str(negatives_csv),
                           "--negative-column", NEGATIVES, "--no-evaluate", "--num-workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hard-negative captions (--negative-column wrong_colour,wrong_shape): " in done.stdout
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    counts = read_captions(negatives_csv, negative_column=NEGATIVES).negative_counts()
    train = start["train_samples"]
    assert start["negative_slots"] == 2
    assert 0 < start["rows_with_negatives"] == train  # every row has its colour swap
    assert start["negative_captions"] < counts.sum()  # the held-out tenth's are not counted
    from mlx_clip.training.run_report import summarize

    data = summarize(tmp_path / "run")["data"]  # what `mlxclip report` shows
    assert (data["negative_captions"], data["rows_with_negatives"]) == (start["negative_captions"], train)
    refused = subprocess.run([MLXCLIP, "finetune", "--model", "tiny", "--steps", "1", "--out", str(tmp_path / "demo"),
                              "--negative-column", "neg"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --negative-column needs --data")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_two_processes_train_as_one(negatives_csv, tmp_path, engine):
    """Each rank embeds its rows' negatives; they are all-gathered with the rows and the mask is the
    global batch's. torch: bit-identical to one process cutting the batch as the ranks do (see
    test_distributed's docstring). MLX: one process sums the text tower's gradient over the captions'
    streams, then the negatives' streams, where each rank sums its captions and negatives before the
    ranks' sum, so only the float32 summation order differs (measured: losses within 1e-6,
    weights 1.5e-8 apart; allowed 1e-7: the update is lr-sized, ~1e-4 here)."""
    from tests.test_distributed import finetune_args, losses, one_process, two_processes, weights

    extra = ("--data", str(negatives_csv), "--negative-column", NEGATIVES, "--val-fraction", "0")
    same_cut = ("--micro-batch-size", "4") if engine == "torch" else ()
    one_process(finetune_args(engine, tmp_path / "one", *extra, *same_cut, steps=4))
    two_processes(engine, finetune_args(engine, tmp_path / "two", *extra, steps=4))
    if engine == "torch":
        assert losses(tmp_path / "one") == losses(tmp_path / "two")
        assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
        return
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-6)
    reference, got = weights(tmp_path / "one"), weights(tmp_path / "two")
    worst = max(float(np.abs(got[name] - reference[name]).max()) for name in reference)
    print(f"largest weight difference: {worst:.2e}")
    assert worst < 1e-7


def test_mlxclip_shard_carries_them_into_the_shards(negatives_csv, tmp_path):
    """`mlxclip shard --negative-column` writes each sample's negatives into its json; finetune reads
    them back from there, in the captions file's order."""
    subset = tmp_path / "pairs.csv"
    subset.write_text("".join(negatives_csv.read_text().splitlines(keepends=True)[:25]))
    done = subprocess.run([MLXCLIP, "shard", str(subset), str(tmp_path / "shards"), "--samples-per-shard", "10",
                           "--negative-column", NEGATIVES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = load_dataset(tmp_path / "shards", negative_column="negatives").samples
    rows = read_captions(subset, negative_column=NEGATIVES)
    assert len(written) == len(rows) == 24
    assert [written[i].negatives for i in range(24)] == [rows[i].negatives for i in range(24)]


def test_the_memory_probe_embeds_the_negatives_too(negatives_csv, tmp_path, monkeypatch):
    """--memory-budget's probes train on batches whose every negative slot is filled (the text
    tower runs on each), with the run's slot count; streamed negatives, not counted ahead, are
    refused by name."""
    from mlx_clip.training import memory_budget

    batch = memory_budget.probe_batch(load_backend("mlx", resolve("tiny")).config, 4, 2)
    assert batch.negative_ids.shape == (4, 2, batch.input_ids.shape[1]) and batch.negative_mask.all()
    seen = []
    real = memory_budget.measure

    def spy(cfg, folder, size, micro, negative_slots=0):
        seen.append(negative_slots)
        return real(cfg, folder, size, micro, negative_slots)

    monkeypatch.setattr(memory_budget, "measure", spy)
    run(negative_config(tmp_path / "run", "mlx", negatives_csv, steps=1, memory_budget="16GB"))
    assert len(seen) >= 3 and set(seen) == {2}
    with pytest.raises(ConfigError, match="--memory-budget cannot size a run whose hard-negative captions are counted"):
        run(negative_config(tmp_path / "streamed", "mlx", _parquet_of(negatives_csv, tmp_path / "p.parquet"),
                            steps=1, memory_budget="16GB"))


@pytest.mark.parametrize("strategy", ["lock-text", "lora"])
def test_locked_and_lora_towers_with_feature_caching(negatives_csv, tmp_path, strategy):
    """A locked text tower embeds the negatives without a gradient to give back, LoRA through its
    adapters; with feature caching the engines still agree (relative 5e-6, as above)."""
    losses = {engine: run(negative_config(tmp_path / engine, engine, negatives_csv, steps=4, save_every=0,
                                          strategy=strategy, micro_batch_size=4)).train.losses
              for engine in ("mlx", "torch")}
    np.testing.assert_allclose(losses["mlx"], losses["torch"], rtol=5e-6)
    assert len(set(losses["mlx"])) > 1  # it trains
