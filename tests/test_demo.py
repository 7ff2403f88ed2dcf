"""The built-in demo domain: deterministic bytes, the promised layout, reuse, separable classes.

Images are decoded with Pillow and read back with our own readers; file identity is sha256 from
hashlib. The separability check measures each shape with a rotation-invariant compactness
(area / (pi * r_max^2): circle 1, square 2/pi, triangle 3*sqrt(3)/(4*pi)) and each colour by the
nearest named RGB, independent of the generator's code paths.
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_clip.data.demo import COLOURS, control_classes, make_demo, target_classes
from mlx_clip.data.records import detect_layout, load_dataset, read_captions
from mlx_clip.errors import ConfigError, DataError

SMALL = dict(image_size=32, per_class_train=3, per_class_val=2, per_class_control=2)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return make_demo(root)


def test_same_seed_gives_identical_bytes_in_different_folders(tmp_path):
    a = make_demo(tmp_path / "a", seed=7, **SMALL)
    b = make_demo(tmp_path / "b" / "nested", seed=7, **SMALL)
    ha, hb = _file_hashes(a["root"]), _file_hashes(b["root"])
    assert len(ha) == 1 + 12 * 5 + 2 + 16 * 2  # manifest, images, two captions files
    assert ha == hb
    c = make_demo(tmp_path / "c", seed=8, **SMALL)
    hc = _file_hashes(c["root"])
    assert hc.keys() == ha.keys()
    assert sum(hc[k] != ha[k] for k in ha) > 0.9 * len(ha)


def test_default_demo_structure(default_demo):
    paths = default_demo
    assert detect_layout(paths["target"]) == "class_folders"
    data = load_dataset(paths["target"])
    assert data.class_names == sorted(target_classes()) and len(data.class_names) == 12
    assert len(data.samples) == 12 * 80 and len(data.val) == 12 * 20 and data.skipped == []
    for sample in data.samples[::97] + data.val[::31]:
        with Image.open(sample.image) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    control = load_dataset(paths["control_val"])
    assert control.class_names == sorted(control_classes()) and len(control.samples) == 16 * 20
    assert not set(control.class_names) & set(data.class_names)
    with pytest.raises(DataError, match=r"it has val/ alone: pass .*control/val itself"):
        load_dataset(paths["control"])


def test_captions_name_the_class_words(default_demo):
    paths = default_demo
    for split, count in (("train", 80), ("val", 20)):
        samples = read_captions(paths[f"captions_{split}"])
        assert len(samples) == 12 * count and len({s.image_id for s in samples}) == 12 * count
        for s in samples:
            colour, shape = s.image.parent.name.split("_")
            assert s.image.parent.parent.name == split
            assert f" {colour} {shape} " in s.caption and "background" in s.caption
        assert {s.caption.split()[1] for s in samples} == {"small", "large"}


def _measure(path: Path) -> tuple[str, str]:
    pixels = np.asarray(Image.open(path), np.float32)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    fg = np.linalg.norm(pixels - background, axis=-1) > 60
    ys, xs = np.nonzero(fg)
    cy, cx = ys.mean(), xs.mean()
    r_max = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2).max() + 0.5
    compactness = fg.sum() / (np.pi * r_max**2)
    shape = "circle" if compactness > 0.8 else "square" if compactness > 0.52 else "triangle"
    mean = pixels[fg].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.asarray(COLOURS[c])))
    return colour, shape


def test_target_classes_are_visually_separable(default_demo):
    paths = default_demo
    images = sorted(paths["target_val"].rglob("*.png"))
    hits = [_measure(p) == tuple(p.parent.name.split("_")) for p in images]
    assert len(images) == 240
    assert np.mean(hits) >= 0.95, np.mean(hits)


def test_reuse_regenerate_and_refuse(tmp_path):
    paths = make_demo(tmp_path / "d", **SMALL)
    probe = paths["target_train"] / "red_circle" / "0000.png"
    stamp = probe.stat().st_mtime_ns
    assert make_demo(tmp_path / "d", **SMALL) == paths
    assert probe.stat().st_mtime_ns == stamp  # complete and unchanged: reused, not rewritten
    before = _file_hashes(paths["root"])
    probe.write_bytes(b"damaged")
    make_demo(tmp_path / "d", **SMALL)  # content hash no longer matches: regenerated
    assert _file_hashes(paths["root"]) == before
    make_demo(tmp_path / "d", **{**SMALL, "per_class_val": 1})  # new parameters: regenerated
    assert len(list((paths["target_val"] / "red_circle").iterdir())) == 1
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and holds no demo.json"):
        make_demo(tmp_path / "foreign", **SMALL)
    assert (tmp_path / "foreign" / "mine.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="image_size must be in"):
        make_demo(tmp_path / "e", image_size=8)
    with pytest.raises(ConfigError, match="per_class_val must be >= 1"):
        make_demo(tmp_path / "e", per_class_val=0)
