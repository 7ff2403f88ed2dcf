"""Bad checkpoint folders fail with one domain error that names the file (and the tensor or field).

Sources are folders written by `transformers.CLIPModel.save_pretrained`; corrupt inputs are made
from them byte by byte. Pickle safety is checked against a pickle that really runs code when
unpickled the ordinary way.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mlx_clip.convert import detect_format, read_checkpoint
from mlx_clip.conversion import convert
from mlx_clip.errors import CheckpointError, ConfigError
from tests.helpers import save_hf, tiny_hf_clip


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf(tiny_hf_clip(seed=0), tmp_path_factory.mktemp("hf") / "src")


@pytest.fixture
def folder(hf_folder, tmp_path):
    return Path(shutil.copytree(hf_folder, tmp_path / "model"))


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def test_missing_weights_file(folder):
    weights(folder).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: file not found"):
        read_checkpoint(folder)


def test_corrupt_bytes(folder):
    weights(folder).write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        read_checkpoint(folder)


def test_truncated_header(folder):
    data = weights(folder).read_bytes()
    weights(folder).write_bytes(data[:64])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*too short"):
        weights(folder).write_bytes(data[:5])
        read_checkpoint(folder)


def test_header_that_is_not_json(folder):
    data = weights(folder).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    weights(folder).write_bytes(data[:8] + b"\xff" * length + data[8 + length:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*header is not JSON"):
        read_checkpoint(folder)


def test_truncated_data(folder):
    data = weights(folder).read_bytes()
    weights(folder).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        read_checkpoint(folder)


def test_config_that_is_not_clip(folder):
    import transformers

    (folder / "config.json").write_text(json.dumps(transformers.BertConfig().to_dict()))
    with pytest.raises(ConfigError, match=r"config\.json is not a CLIP, SigLIP or SigLIP 2 config \(model_type='bert'"):
        read_checkpoint(folder)


def test_shape_mismatch_names_tensor_and_shapes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor text_model\.encoder\.layers\.0\.mlp"
                                              r"\.fc1\.weight has shape \(64, 32\), expected \(48, 32\)"):
        read_checkpoint(folder)


def test_missing_and_unexpected_tensors_are_listed(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(weights(folder)))
    gone = ["text_projection.weight", "logit_scale"]
    save_file({k: v for k, v in tensors.items() if k not in gone}, str(weights(folder)), {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 2 tensors .* missing: logit_scale, "
                                              r"text_projection\.weight$"):
        read_checkpoint(folder)
    extra = {f"vision_model.extra.{i}": np.zeros(2, np.float32) for i in range(7)}
    save_file({**tensors, **extra}, str(weights(folder)), {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"7 tensors that config\.json does not describe: "
                                              r"vision_model\.extra\.0, .* and 2 more"):
        read_checkpoint(folder)


def test_unknown_folder_lists_what_was_expected(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a CLIP checkpoint folder; expected config\.json \+ "
                                              r"model\.safetensors .*open_clip_config\.json.*found README\.md"):
        detect_format(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out", to="mlx")


def test_open_clip_config_without_weights_or_with_unsupported_fields(tmp_path):
    model_cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16,
                                                   ls_init_value=1e-5),
                     text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=2))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    with pytest.raises(CheckpointError, match=r"open_clip_model\.safetensors: file not found"):
        read_checkpoint(tmp_path)
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"open_clip_config\.json: model_cfg\.vision_cfg\.ls_init_value=1e-05 "
                                          r"is not supported"):
        read_checkpoint(tmp_path)


# ---------------------------------------------------------------- pickle


def to_bin(folder: Path) -> Path:
    """The same checkpoint as a legacy pytorch_model.bin (torch.save of the state dict)."""
    from safetensors.torch import load_file

    torch.save(load_file(str(weights(folder))), folder / "pytorch_model.bin")
    weights(folder).unlink()
    return folder / "pytorch_model.bin"


def test_pickle_needs_allow_pickle_and_then_reads_the_same(folder, hf_folder):
    path = to_bin(folder)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: .*--allow-pickle"):
        read_checkpoint(folder)
    loaded, reference = read_checkpoint(folder, allow_pickle=True), read_checkpoint(hf_folder)
    assert path.is_file() and sorted(loaded.tensors) == sorted(reference.tensors)
    for name, value in reference.tensors.items():
        np.testing.assert_array_equal(loaded.tensors[name], value)


class Payload:
    """Unpickling this calls Path.touch(marker): code execution, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_runs(folder, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = to_bin(folder)
    state = {"logit_scale": torch.tensor(1.0), "payload": Payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with path.open("wb") as f:
            pickle.dump(state, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)"):
        read_checkpoint(folder, allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        convert(folder, tmp_path / "out", to="mlx", allow_pickle=True)
    assert not marker.exists()
    # The payload is live: an ordinary unpickle runs it.
    torch.load(path, weights_only=False) if writer == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()
    os.remove(marker)


@pytest.mark.parametrize("version, safe", [("2.5.1", False), ("2.4.0+cpu", False), ("2.6.0", True),
                                           ("2.14.1+cu128", True), ("3.0.0", True)])
def test_pickles_need_a_torch_whose_unpickler_is_safe(version, safe, tmp_path):
    from mlx_clip.convert.pickle_weights import check_safe_unpickler

    if safe:
        check_safe_unpickler(version, tmp_path / "pytorch_model.bin")
    else:
        with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: reading pickled weights needs torch >= 2\.6"):
            check_safe_unpickler(version, tmp_path / "pytorch_model.bin")
