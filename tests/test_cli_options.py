"""Every TrainConfig field reaches the config through its `mlxclip finetune` flag, with its real
type; files and presets are type-checked when the config is resolved."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

import mlx_clip.finetune
from mlx_clip.cli import main
from mlx_clip.errors import ConfigError
from mlx_clip.training.options import TrainConfig

# A valid value for each field, unlike its default where the field allows it.
VALID = {
    "model": "small", "data": "some/captions.csv", "val_data": "held/out", "val_fraction": 0.2,
    "control_data": "control/", "templates": "t.txt", "out": "runs/x", "backend": "torch", "device": "cpu",
    "dtype": "float32", "precision": "amp_bf16", "steps": 7, "epochs": 2.5, "batch_size": 16, "image_size": 48, "memory_budget": "8GB", "micro_batch_size": 4, "lr": 3e-4,
    "warmup_steps": 3, "min_lr_ratio": 0.1, "weight_decay": 0.2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-8,
    "grad_clip": 0.5, "loss": "siglip", "label_smoothing": 0.1, "hard_negative_beta": 0.5,
    "multi_positive": False, "strategy": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "q_proj",
    "augment": False, "crop_scale_min": 0.5, "gradient_checkpointing": True, "seed": 3, "num_workers": 1,
    "image_column": "path", "caption_column": "text", "max_bad_fraction": 0.2, "log_every": 5, "save_every": 50,
    "keep_checkpoints": 3, "evaluate": False,
    "eval_every": 20, "max_control_drop": 0.1, "max_nan_steps": 2, "resume": "latest",
}


def _valid(f: dataclasses.Field):
    if f.name in VALID:
        return VALID[f.name]
    kind, _ = TrainConfig.field_types()[f.name]
    # A field added later: its default is valid by definition; flip booleans to see the flag work.
    return (not f.default) if kind is bool else f.default


def _as_args(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    return [flag, str(value)]


def test_every_field_through_the_cli(monkeypatch):
    seen = {}
    monkeypatch.setattr(mlx_clip.finetune, "finetune", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    fields = [f for f in dataclasses.fields(TrainConfig) if _valid(f) is not None]
    args = [a for f in fields for a in _as_args(f.name, _valid(f))]
    result = CliRunner().invoke(main, ["finetune", *args])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    for f in fields:
        value = getattr(cfg, f.name)
        assert value == _valid(f) and type(value) is type(_valid(f)), (f.name, value, _valid(f))


def test_optional_number_flag_is_a_number():
    """--max-control-drop was mapped to str and crashed validation with a TypeError."""
    result = CliRunner().invoke(main, ["finetune", "--max-control-drop", "0.1", "--steps", "x"])
    assert result.exit_code == 2 and "'x' is not a valid integer" in result.output
    result = CliRunner().invoke(main, ["finetune", "--max-control-drop", "abc"])
    assert result.exit_code == 2 and "'abc' is not a valid float" in result.output


@pytest.mark.parametrize("line, message", [
    ('val_fraction = "0.1"', "val_fraction must be a number, got '0.1' (str)"),
    ('lora_targets = ["q_proj"]', "lora_targets must be a string, got ['q_proj'] (list)"),
    ("steps = true", "steps must be an integer or null, got True (bool)"),
    ("steps = 2.5", "steps must be an integer or null, got 2.5 (float)"),
    ("augment = 1", "augment must be true or false, got 1 (int)"),
])
def test_config_file_values_of_the_wrong_type_are_refused(tmp_path, line, message):
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.resolve(path)
    assert str(err.value) == f"{path}: {message}"
    result = CliRunner().invoke(main, ["finetune", "--config", str(path)])
    assert result.exit_code == 2 and result.output.strip() == f"error: {path}: {message}"


def test_yaml_and_integers_for_floats_are_accepted(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1\nmax_control_drop: null\nsteps: 5\n")
    cfg = TrainConfig.resolve(path)
    assert cfg.lr == 1 and cfg.max_control_drop is None and cfg.steps == 5


def test_bad_data_is_reported_before_the_model_is_looked_up(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail("the model was looked up before --data was checked"))
    result = CliRunner().invoke(main, ["finetune", "--model", "org/some-model", "--data", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and str(tmp_path / "nope") in result.output, result.output


@pytest.mark.parametrize("command", ["embed", "eval", "wise-ft", "finetune", "serve", "index"])
def test_every_command_that_runs_a_model_has_the_same_loading_options(command):
    params = {opt for p in main.commands[command].params for opt in getattr(p, "opts", [])}
    assert {"--device", "--dtype", "--allow-pickle", "--backend"} <= params, sorted(params)


def test_wise_ft_sweep_names_the_missing_control(tmp_path):
    result = CliRunner().invoke(main, ["wise-ft", "--zero-shot", "tiny", "--fine-tuned", "tiny", "--sweep", "0:1:0.5",
                                       "--eval-target", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --sweep needs --eval-control: each alpha is scored")
