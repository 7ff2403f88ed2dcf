"""`mlxclip eval`'s bad input: each refused with one clear error naming the problem, before any
model is loaded (the model path given does not exist)."""

import mlx_clip  # noqa: F401  (first, as everywhere)

from pathlib import Path

import pytest
from PIL import Image

from mlx_clip.errors import ConfigError, DataError
from mlx_clip.evaluation.evaluate import evaluate


def _class_root(tmp_path: Path, counts: dict[str, int]) -> Path:
    root = tmp_path / "classes"
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("case, error, match", [
    ("no_classes", DataError, "not a dataset"),
    ("empty_class", DataError, "has no images"),
    ("template_without_braces", DataError, "needs exactly one"),
    ("class_file_mismatch", DataError, "does not match the class folders"),
    ("neither_layout", DataError, "not a dataset"),
    ("retrieval_on_class_folders", DataError, "task zeroshot_retrieval needs a captions file"),
    ("probe_without_train_split", DataError, "linear_probe needs class folders with train/ and val/"),
    ("unknown_task", ConfigError, "unknown task"),
])
def test_bad_input_fails_with_one_clear_error_before_any_model_loads(tmp_path, case, error, match):
    kwargs = {}
    if case == "no_classes":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "empty_class":
        data = _class_root(tmp_path, {"cat": 2, "dog": 0})
    elif case == "template_without_braces":
        data = _class_root(tmp_path, {"cat": 1, "dog": 1})
        kwargs["templates"] = ["a photo of a cat"]
    elif case == "class_file_mismatch":
        data = _class_root(tmp_path, {"cat": 1, "dog": 1})
        (tmp_path / "classes.txt").write_text("cat\nbird\n")
        kwargs["classes"] = tmp_path / "classes.txt"
    elif case == "neither_layout":
        data = tmp_path / "notes"
        data.mkdir()
        (data / "readme.txt").write_text("hello")
    else:
        data = _class_root(tmp_path, {"cat": 1, "dog": 1})
        kwargs["tasks"] = {"retrieval_on_class_folders": ["retrieval"], "unknown_task": ["detection"],
                           "probe_without_train_split": ["linear_probe"]}[case]
    # A model that does not exist: the data must be refused first, without loading anything.
    with pytest.raises(error, match=match):
        evaluate(tmp_path / "no-model-here", data, **kwargs)
