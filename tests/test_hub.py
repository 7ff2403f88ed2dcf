"""Hub ids resolve through huggingface_hub's own cache, offline, never the network.

The cache is laid out as huggingface_hub lays it out (`models--org--name/refs/main`,
`snapshots/<commit>/…`, and its cached tree listing written by its own `write_tree_cache`); the
files in it are a random tiny CLIP saved by `transformers.CLIPModel.save_pretrained`. Offline mode
is switched on both ways huggingface_hub reads it: the environment (for anything imported later)
and `huggingface_hub.constants`, which captured the environment when it was first imported.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlx_clip.cli import main
from mlx_clip.errors import CheckpointError
from mlx_clip.model.hub import resolve_model
from mlx_clip.model.tokenizer import load_tokenizer
from tests.helpers import random_pixels, save_hf, tiny_hf_clip

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EMBED_TOL = 1e-5  # float32 MLX vs transformers on a 2-layer tower, max abs over unit vectors


def add_repo(cache: Path, repo_id: str, files: dict[str, bytes] | None = None, model=None,
             listing: list[str] | None = None) -> Path:
    """One cached repository at COMMIT, `refs/main` pointing at it; returns the snapshot folder."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    if model is not None:
        save_hf(model, snapshot)
        load_tokenizer().save_pretrained(snapshot)
    for name, data in (files or {}).items():
        (snapshot / name).write_bytes(data)
    if listing is not None:
        # What an online snapshot_download leaves behind: the repo's full file list at COMMIT.
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        write_tree_cache(str(storage), COMMIT, {n: TreeCacheEntry(size=1, blob_id="0" * 40) for n in listing})
    return snapshot


@pytest.fixture(scope="module")
def reference():
    return tiny_hf_clip(seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference):
    root = tmp_path_factory.mktemp("hf-hub-cache")
    # A pytorch_model.bin beside the safetensors that no unpickler could read: if it were ever
    # opened, loading would fail.
    add_repo(root, "org/tiny-clip", {"pytorch_model.bin": b"not a pickle"}, model=reference)
    bin_only = add_repo(root, "org/bin-only", model=reference)
    from safetensors.torch import load_file

    torch.save(load_file(str(bin_only / "model.safetensors")), bin_only / "pytorch_model.bin")
    (bin_only / "model.safetensors").unlink()
    return root


@pytest.fixture
def offline(cache, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.is_offline_mode()
    return cache


def snapshot_of(cache: Path, repo_id: str) -> Path:
    return (cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT).resolve()


def test_hub_id_resolves_to_the_cached_snapshot(offline):
    expected = snapshot_of(offline, "org/tiny-clip")
    assert resolve_model("org/tiny-clip").resolve() == expected
    assert resolve_model("org/tiny-clip", revision=COMMIT).resolve() == expected
    assert resolve_model("org/tiny-clip", cache_dir=offline).resolve() == expected


@torch.no_grad()
def test_load_hub_id_embeds_like_transformers(offline, reference, rng):
    clip = mlx_clip.load("org/tiny-clip", "mlx")
    assert clip.folder.resolve() == snapshot_of(offline, "org/tiny-clip")
    texts = ["a photo of a cat", "two dogs on a sofa"]
    tokens = clip.tokenizer.encode(texts)
    pixels = random_pixels(rng, 2, 32)
    expected_txt = reference.get_text_features(input_ids=torch.from_numpy(tokens).long())
    expected_img = reference.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    for got, out in ((clip.encode_texts(texts), expected_txt), (clip.encode_images(pixels), expected_img)):
        want = getattr(out, "pooler_output", out)
        want = (want / want.norm(dim=-1, keepdim=True)).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape == (2, 16)
        assert np.abs(got - want).max() <= EMBED_TOL


def test_allow_patterns_exclude_pickles_unless_allowed(offline, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    repo_files = ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                  "vocab.json", "merges.txt", "preprocessor_config.json", "open_clip_config.json",
                  "open_clip_model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json",
                  "pytorch_model-00001-of-00002.bin", "open_clip_pytorch_model.bin", "tf_model.h5",
                  "flax_model.msgpack", "README.md"]
    pickles = {"pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
               "open_clip_pytorch_model.bin"}
    resolve_model("org/tiny-clip")
    resolve_model("org/tiny-clip", allow_pickle=True)
    safe, allowed = (set(filter_repo_objects(repo_files, allow_patterns=c["allow_patterns"])) for c in calls)
    assert safe == set(repo_files) - pickles - {"tf_model.h5", "flax_model.msgpack", "README.md"}
    assert allowed == safe | pickles


def test_cached_pickle_is_read_only_with_allow_pickle(offline, reference):
    # The snapshot of org/tiny-clip holds an unreadable pytorch_model.bin: it loaded above, so the
    # safetensors file won. Here the pickle is the only weights file.
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: .*--allow-pickle"):
        mlx_clip.load("org/bin-only", "mlx")
    from_bin = mlx_clip.load("org/bin-only", "mlx", allow_pickle=True).encode_texts(["a cat"])
    from_safetensors = mlx_clip.load("org/tiny-clip", "mlx").encode_texts(["a cat"])
    np.testing.assert_array_equal(from_bin, from_safetensors)


def test_patterns_decide_what_a_cached_snapshot_must_hold(offline, reference):
    pytest.importorskip("huggingface_hub._tree_cache", reason="this huggingface_hub keeps no tree listing")
    # huggingface_hub's tree listing says the repo has pytorch_model.bin; the snapshot lacks it (it
    # was fetched without --allow-pickle). That is complete for a safe load, not for a pickle one.
    add_repo(offline, "org/listed", model=reference,
             listing=["config.json", "model.safetensors", "pytorch_model.bin", "README.md", "tokenizer.json"])
    assert resolve_model("org/listed").resolve() == snapshot_of(offline, "org/listed")
    with pytest.raises(CheckpointError) as info:
        resolve_model("org/listed", allow_pickle=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("org/listed: the cached snapshot ") and "pytorch_model.bin" in message


def test_missing_hub_id_offline_is_one_line(offline, tmp_path):
    with pytest.raises(CheckpointError) as info:
        resolve_model("org/missing")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("org/missing: not in the local Hugging Face cache")
    result = CliRunner().invoke(main, ["embed", "--model", "org/missing", "--text", "a cat",
                                       "--out", str(tmp_path / "e.npz")])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {info.value}"]
    assert "Traceback" not in result.output and not (tmp_path / "e.npz").exists()


def test_not_a_folder_nor_a_hub_id(offline, tmp_path):
    with pytest.raises(CheckpointError, match=r"absent: no such folder$"):
        resolve_model(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match=r"no such folder, and not a hub id of the form org/name$"):
        resolve_model("a/b/c")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: expected a model folder"):
        resolve_model(tmp_path / "weights.safetensors")


@pytest.mark.parametrize("name", ["runs/mine", "./mine", "../x/y", "~/nowhere-at-all/m"])
def test_a_mistyped_local_path_is_never_asked_of_the_hub(offline, tmp_path, monkeypatch, name):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail(f"{name} was looked up on the hub"))
    with pytest.raises(CheckpointError) as info:
        resolve_model(name)
    assert str(info.value) == f"{name}: no such folder"


def test_a_name_whose_first_part_is_not_a_folder_is_a_hub_id(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_model("openai/clip-vit-base-patch32")
