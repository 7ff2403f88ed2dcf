"""Dataset readers, templates and splits.

References: captions files are written with Python's own `csv.writer` / `json.dumps` (quoting,
escaping and dialects are theirs, not ours), and the default prompts are checked against the
CLIP ImageNet templates that open_clip ships (`open_clip/zero_shot_metadata.py`).
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import csv
import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mlx_clip.data.records import (
    class_counts,
    detect_layout,
    load_classes,
    load_dataset,
    load_templates,
    read_captions,
    read_class_folders,
    split_samples,
)
from mlx_clip.data.sample import Sample
from mlx_clip.data.templates import DEFAULT_TEMPLATES, fill, prompt_name
from mlx_clip.errors import ConfigError, DataError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


def _write_csv(path: Path, rows: list[list[str]], dialect: str = "excel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, dialect=dialect).writerows(rows)
    return path


def _class_tree(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / name / f"{i:03d}.png")
    return root


# --- captions files ---------------------------------------------------------------------------


def test_csv_quoted_commas_multiline_and_relative_paths(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b b.png")
    captions = ['a dog, a cat, and a "bird"', "second caption of a", "b, on two\nlines"]
    path = _write_csv(
        tmp_path / "sub" / "caps.csv",
        [
            ["image", "caption"],
            ["../imgs/a.png", captions[0]],
            ["../imgs/a.png", captions[1]],
            ["../imgs/b b.png", captions[2]],
        ],
    )
    samples = read_captions(path)
    assert [s.caption for s in samples] == [captions[0], captions[1], "b, on two lines"]
    assert samples[0].image == (tmp_path / "imgs" / "a.png").resolve()
    assert samples[0].image.is_absolute()
    assert [s.image_id for s in samples] == [0, 0, 1]  # two captions of a.png share an id
    assert all(s.label is None for s in samples)


def test_tsv_filepath_title_by_extension_and_by_sniffing(tmp_path):
    _png(tmp_path / "x.png")
    rows = [["filepath", "title", "extra"], ["x.png", "a title, with a comma", "1"]]
    by_ext = read_captions(_write_csv(tmp_path / "caps.tsv", rows, dialect="excel-tab"))
    # A tab-separated file named .csv: the header decides, not the extension.
    sniffed = read_captions(_write_csv(tmp_path / "tabs.csv", rows, dialect="excel-tab"))
    assert by_ext == sniffed
    assert by_ext[0].caption == "a title, with a comma"
    assert by_ext[0].image == (tmp_path / "x.png").resolve()


def test_named_columns_are_case_insensitive(tmp_path):
    _png(tmp_path / "x.png")
    path = _write_csv(
        tmp_path / "c.csv", [["Path", "Text"], [str(tmp_path / "x.png"), "absolute path"]]
    )
    (sample,) = read_captions(path, image_column="path", caption_column="text")
    assert sample.image == (tmp_path / "x.png").resolve() and sample.caption == "absolute path"


def test_jsonl_caption_lists_share_image_ids(tmp_path):
    for name in ("a.png", "b.png"):
        _png(tmp_path / "img" / name)
    records = [
        {"image": "img/a.png", "caption": ["first of a", "second of a"]},
        {"image": "img/b.png", "caption": "only b", "other": 3},
        {"image": "img/a.png", "caption": "third of a"},
    ]
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    samples = read_captions(path)
    assert [(s.caption, s.image_id) for s in samples] == [
        ("first of a", 0),
        ("second of a", 0),
        ("only b", 1),
        ("third of a", 0),
    ]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("cols.csv", "file,text\nx.png,hi\n", ["cols.csv", "no image column", "'file', 'text'"]),
        ("cap.csv", "image,text\nx.png,hi\n", ["cap.csv", "no caption column", "'image', 'text'"]),
        ("empty.csv", "", ["empty.csv", "empty"]),
        ("blank.jsonl", "\n  \n", ["blank.jsonl", "empty"]),
        ("header.csv", "image,caption\n", ["header.csv", "no rows"]),
        (
            "badjson.jsonl",
            '{"image": "x.png", "caption": "ok"}\n{"image": "x.png",\n',
            ["badjson.jsonl:2", "bad JSON"],
        ),
        ("notobj.jsonl", '["x.png", "hi"]\n', ["notobj.jsonl:1", "JSON object"]),
        (
            "key.jsonl",
            '{"img": "x.png", "caption": "hi"}\n',
            ["key.jsonl:1", "no image key", "'img'"],
        ),
        (
            "captype.jsonl",
            '{"image": "x.png", "caption": [1]}\n',
            ["captype.jsonl:1", "'caption'", "[1]"],
        ),
        (
            "emptycap.csv",
            'image,caption\nx.png,hi\nx.png,"  "\n',
            ["emptycap.csv:3", "'caption' is empty", "x.png"],
        ),
        (
            "emptycap.jsonl",
            '{"image": "x.png", "caption": ["ok", ""]}\n',
            ["emptycap.jsonl:1", "empty"],
        ),
        ("noimg.csv", "image,caption\n,hi\n", ["noimg.csv:2", "'image' is empty"]),
        (
            "fields.csv",
            "image,caption\nx.png,a dog, a cat\n",
            ["fields.csv:2", "3 fields", "header has 2"],
        ),
    ],
)
def test_caption_errors_name_file_line_and_value(tmp_path, name, content, expected):
    _png(tmp_path / "x.png")
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_captions(path)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_missing_images_report_count_and_first_paths(tmp_path):
    _png(tmp_path / "ok.png")
    rows = [["image", "caption"], ["ok.png", "fine"]] + [
        [f"gone{i}.png", f"c{i}"] for i in range(5)
    ]
    path = _write_csv(tmp_path / "c.csv", rows)
    with pytest.raises(DataError) as err:
        read_captions(path)
    message = str(err.value)
    assert "c.csv" in message and "5 of 6 image(s) not found" in message
    assert "line 3: gone0.png" in message and "gone2.png" in message and "gone4.png" not in message


def test_missing_explicit_column_lists_found(tmp_path):
    path = _write_csv(tmp_path / "c.csv", [["image", "caption"], ["x.png", "hi"]])
    with pytest.raises(
        DataError,
        match=r"c\.csv:1: no caption column named 'text'; columns found: 'image', 'caption'",
    ):
        read_captions(path, caption_column="text")


# --- templates and class folders --------------------------------------------------------------


def _openai_imagenet_templates() -> list[str]:
    # zero_shot_metadata.py is plain data: load it alone so the test does not import torch.
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip not installed")
    file = Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("_oc_zero_shot_metadata", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return [t("{}") for t in module.OPENAI_IMAGENET_TEMPLATES]


def test_default_templates_are_clip_imagenet_prompts():
    reference = set(_openai_imagenet_templates())
    assert 8 <= len(DEFAULT_TEMPLATES) <= 12
    assert set(DEFAULT_TEMPLATES) <= reference
    assert "a photo of a {}." in DEFAULT_TEMPLATES
    assert fill("a photo of a {}.", "red_circle") == "a photo of a red circle."
    assert prompt_name("  golden__retriever ") == "golden retriever"
    for bad in ("a photo", "{} and {}", ""):
        with pytest.raises(DataError, match="template"):
            fill(bad, "x")
    with pytest.raises(DataError, match="class name"):
        fill("a {}.", "_")


def test_class_folders_captions_skips_and_seeded_templates(tmp_path):
    root = _class_tree(tmp_path / "data", {"golden_retriever": 30, "cat": 20})
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "sub").mkdir()
    (root / "cat" / ".DS_Store").write_text("")
    (root / ".hidden").mkdir()
    _png(root / "cat" / "UPPER.JPG")
    (root / "README.md").write_text("about")
    templates = ["a photo of a {}.", "itap of a {}.", "art of the {}."]
    data = read_class_folders(root, templates=templates, seed=3)
    assert data.class_names == ["cat", "golden_retriever"]
    assert data.templates == templates
    assert sorted(p.name for p in data.skipped) == ["README.md", "notes.txt", "sub"]
    counts = class_counts(data.samples)
    assert counts == {0: 21, 1: 30}
    assert len({s.image_id for s in data.samples}) == len(data.samples) == 51
    allowed = {
        label: {t.replace("{}", w) for t in templates}
        for label, w in ((0, "cat"), (1, "golden retriever"))
    }
    assert all(s.caption in allowed[s.label] for s in data.samples)
    assert all(
        s.image.is_absolute() and s.image.parent.name == data.class_names[s.label]
        for s in data.samples
    )
    # Template choice is seeded: same seed, same captions; another seed, other choices.
    again = read_class_folders(root, templates=templates, seed=3)
    other = read_class_folders(root, templates=templates, seed=4)
    assert [s.caption for s in again.samples] == [s.caption for s in data.samples]
    assert [s.caption for s in other.samples] != [s.caption for s in data.samples]
    assert len({s.caption for s in data.samples if s.label == 1}) == 3  # all templates get used
    default = read_class_folders(root)
    assert default.templates == list(DEFAULT_TEMPLATES)


def test_class_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        read_class_folders(tmp_path)
    root = _class_tree(tmp_path / "d", {"dog": 2, "empty_one": 0})
    (root / "empty_one" / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"class folder 'empty_one' has no images"):
        read_class_folders(root)
    root = _class_tree(tmp_path / "ok", {"dog": 2})
    with pytest.raises(DataError, match=r"templates\[1\] 'no placeholder' has 0"):
        read_class_folders(root, templates=["a {}.", "no placeholder"])
    with pytest.raises(DataError, match="templates is empty"):
        read_class_folders(root, templates=[])


def test_template_and_class_files(tmp_path):
    tfile = tmp_path / "templates.txt"
    tfile.write_text("# prompts\na photo of a {}.\n\n  a sketch of a {}.  \n")
    assert load_templates(tfile) == ["a photo of a {}.", "a sketch of a {}."]
    tfile.write_text("a photo of a {}.\n# fine\nbroken template\n")
    with pytest.raises(DataError, match=r"templates\.txt:3: template 'broken template'"):
        load_templates(tfile)
    tfile.write_text("# only comments\n")
    with pytest.raises(DataError, match="no templates"):
        load_templates(tfile)

    root = _class_tree(tmp_path / "d", {"ant": 1, "bee": 2, "cow": 1})
    cfile = tmp_path / "classes.txt"
    cfile.write_text("cow\nant\nbee\n")
    assert load_classes(cfile, root) == ["cow", "ant", "bee"]
    data = load_dataset(root, classes=cfile)  # the file's order is the label order
    assert data.class_names == ["cow", "ant", "bee"]
    assert {s.image.parent.name for s in data.samples if s.label == 0} == {"cow"}
    cfile.write_text("ant\nbee\nyak\n")
    with pytest.raises(
        DataError,
        match=r"1 listed class\(es\) have no folder: yak; 1 folder\(s\) are not listed: cow",
    ):
        load_classes(cfile, root)
    cfile.write_text("ant\nant\n")
    with pytest.raises(DataError, match=r"classes\.txt:2: class 'ant' already listed on line 1"):
        load_classes(cfile)


# --- layouts ----------------------------------------------------------------------------------


def test_detect_layout_and_load_dataset(tmp_path):
    _png(tmp_path / "caps" / "images" / "a.png")
    cap = _write_csv(
        tmp_path / "caps" / "captions.csv", [["image", "caption"], ["images/a.png", "an a"]]
    )
    assert detect_layout(cap) == "captions"
    assert (
        detect_layout(cap.parent) == "captions"
    )  # the captions file wins over images/ as a "class"
    data = load_dataset(cap.parent)
    assert (data.kind, data.class_names, data.templates, data.val) == ("captions", None, None, None)
    assert data.samples[0].caption == "an a"

    classes = _class_tree(tmp_path / "cls", {"a": 2, "b": 2})
    assert detect_layout(classes) == "class_folders"
    data = load_dataset(classes, templates=["itap of a {}."])
    assert (
        data.kind == "class_folders" and data.class_names == ["a", "b"] and data.source == classes
    )
    assert {s.caption for s in data.samples} == {"itap of a a.", "itap of a b."}

    (tmp_path / "neither" / "sub").mkdir(parents=True)
    (tmp_path / "neither" / "notes.txt").write_text("")
    with pytest.raises(
        DataError, match="expected a captions file .* or class folders ROOT/<class name>"
    ):
        load_dataset(tmp_path / "neither")
    with pytest.raises(DataError, match="no such file"):
        detect_layout(tmp_path / "missing")
    with pytest.raises(DataError, match="not a captions file"):
        load_dataset(tmp_path / "caps" / "images" / "a.png")
    _write_csv(tmp_path / "caps" / "more.jsonl", [["x"]])
    with pytest.raises(DataError, match=r"several captions files \(captions\.csv, more\.jsonl\)"):
        load_dataset(tmp_path / "caps")


def test_given_split_class_folders_maps_val_labels(tmp_path):
    _class_tree(tmp_path / "train", {"ant": 3, "bee": 2, "cow": 2})
    _class_tree(tmp_path / "validation", {"bee": 1, "cow": 2})  # val may lack a class
    assert detect_layout(tmp_path) == "class_folders"
    data = load_dataset(tmp_path)
    assert data.class_names == ["ant", "bee", "cow"] and len(data.samples) == 7
    assert [(s.image.parent.name, s.label) for s in data.val] == [
        ("bee", 1),
        ("cow", 2),
        ("cow", 2),
    ]
    ids = [s.image_id for s in data.samples + data.val]
    assert len(set(ids)) == len(ids)  # ids stay unique across the two splits
    _class_tree(tmp_path / "validation", {"yak": 1})
    with pytest.raises(DataError, match="class folder\\(s\\) not in the train split: yak"):
        load_dataset(tmp_path)


def test_given_split_captions(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / split / "a.png")
        _write_csv(
            tmp_path / split / "c.csv",
            [["image", "caption"], ["a.png", f"{split} a"], ["a.png", "again"]],
        )
    data = load_dataset(tmp_path)
    assert data.kind == "captions" and data.source == tmp_path
    assert [(s.caption, s.image_id) for s in data.samples] == [("train a", 0), ("again", 0)]
    assert [(s.caption, s.image_id) for s in data.val] == [("val a", 1), ("again", 1)]


# --- split ------------------------------------------------------------------------------------


def _labelled(per_class: list[int], captions_per_image: int = 1) -> list[Sample]:
    samples, image_id = [], 0
    for label, n in enumerate(per_class):
        for i in range(n):
            for c in range(captions_per_image):
                samples.append(Sample(Path(f"/d/{label}/{i}.png"), f"c{c}", label, image_id))
            image_id += 1
    return samples


def test_split_is_grouped_stratified_seeded_and_disjoint():
    samples = _labelled([10, 7, 2, 1, 30], captions_per_image=3)
    train, val = split_samples(samples, 0.2, seed=5)
    assert sorted(train + val, key=samples.index) == samples
    assert not {s.image_id for s in train} & {s.image_id for s in val}
    sides = defaultdict(set)
    for side, part in (("train", train), ("val", val)):
        for s in part:
            sides[s.image_id].add(side)
    assert all(len(v) == 1 for v in sides.values())  # every caption of an image on one side
    val_counts, train_counts = class_counts(val), class_counts(train)
    assert val_counts == {0: 2, 1: 1, 2: 1, 4: 6}  # round(n * 0.2), at least 1 when n >= 2
    assert train_counts == {0: 8, 1: 6, 2: 1, 3: 1, 4: 24}  # a 1-image class stays in train
    assert train == [s for s in samples if s in train]  # input order kept
    assert split_samples(samples, 0.2, seed=5) == (train, val)
    assert split_samples(samples, 0.2, seed=6) != (train, val)


def test_split_unlabelled_and_edge_fractions():
    samples = [
        Sample(Path(f"/x/{i // 2}.png"), f"c{i}", None, i // 2) for i in range(40)
    ]  # 20 images
    train, val = split_samples(samples, 0.25, seed=0)
    assert len({s.image_id for s in val}) == 5 and len(train) + len(val) == 40
    assert split_samples(samples, 0.0) == (samples, [])
    assert split_samples(samples, 0.01)[1] != []  # a positive fraction keeps at least one image
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match="val_fraction"):
            split_samples(samples, bad)
