"""Bad fine-tuning input is refused before training starts: one `error:` line, exit code 2."""

import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_clip.cli import main
from tests.helpers import assert_refused


def finetune(tmp_path, *args):
    result = CliRunner().invoke(main, ["finetune", "--out", str(tmp_path / "run"), "--steps", "2",
                                       "--no-evaluate", *args])
    return result


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path)


def test_empty_captions_file(tmp_path):
    (tmp_path / "caps.csv").write_text("image,caption\n")
    assert_refused(finetune(tmp_path, "--data", str(tmp_path / "caps.csv")), "caps.csv")


def test_missing_columns(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "caps.csv").write_text("picture,text\na.png,a red square\n")
    assert_refused(finetune(tmp_path, "--data", str(tmp_path / "caps.csv")), "caps.csv", "picture")


def test_captions_pointing_at_missing_files(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "caps.csv").write_text("image,caption\na.png,a red square\nnope.png,a blue circle\n")
    assert_refused(finetune(tmp_path, "--data", str(tmp_path / "caps.csv")), "nope.png")


def test_folder_that_is_neither_layout(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    assert_refused(finetune(tmp_path, "--data", str(tmp_path / "data")), "data")


def test_unknown_config_key(tmp_path):
    (tmp_path / "run.toml").write_text("lr = 1e-4\nlearning_rat = 3\n")
    assert_refused(finetune(tmp_path, "--config", str(tmp_path / "run.toml")), "run.toml", "learning_rat")


def test_unknown_flag_is_a_usage_error(tmp_path):
    result = finetune(tmp_path, "--learning-rat", "3")
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.mark.parametrize("args, needle", [
    (["--lr", "-1e-4"], "lr must be a positive number"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--val-fraction", "1.5"], "val_fraction"),
    (["--strategy", "partial"], "strategy must be one of"),
    (["--loss", "triplet"], "loss must be one of"),
])
def test_nonsense_values(tmp_path, args, needle):
    assert_refused(finetune(tmp_path, *args), needle)


def test_flag_overrides_file_overrides_default(tmp_path):
    from mlx_clip.training.options import TrainConfig

    (tmp_path / "run.yaml").write_text("lr: 0.001\nbatch_size: 4\n")
    cfg = TrainConfig.resolve(tmp_path / "run.yaml", {"batch_size": 8})
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay) == (0.001, 8, TrainConfig().weight_decay)


def test_help_documents_every_option():
    from mlx_clip.training.options import TrainConfig

    text = CliRunner().invoke(main, ["finetune", "--help"], terminal_width=200).output
    for name in TrainConfig.field_names():
        assert "--" + name.replace("_", "-") in text, name
