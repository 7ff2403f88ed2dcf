"""A model's own tokenizer and image normalisation travel through fine-tuning, WiSE-FT and
conversion (before, final/ always got OpenAI's files). The source model here has a 518-token
BPE vocabulary and a mean/std unlike OpenAI's; transformers' own classes read the results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from mlx_clip.api import load
from mlx_clip.conversion import convert
from mlx_clip.model.tokenizer import load_tokenizer
from mlx_clip.robust.wise_ft import wise_ft
from tests.helpers import save_hf, tiny_hf_clip
from tests.test_tokenizer import TINY_TEXTS, _tiny_vocab
from tests.train_helpers import run, small_config

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = save_hf(tiny_hf_clip(seed=3), tmp_path_factory.mktemp("custom") / "model")
    vocab, merges = _tiny_vocab()
    transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                image_mean=MEAN, image_std=STD)
    processor.save_pretrained(folder)
    return folder


def assert_carries(folder, source):
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    assert list(processor.image_mean) == MEAN and list(processor.image_std) == STD
    assert len(transformers.CLIPTokenizer.from_pretrained(folder)) == 518
    np.testing.assert_array_equal(load_tokenizer(folder).encode(TINY_TEXTS), load_tokenizer(source).encode(TINY_TEXTS))
    clip = load(folder, "mlx")
    assert clip.mean == tuple(MEAN) and clip.std == tuple(STD)


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_finetune_final_keeps_the_source_tokenizer_and_normalisation(source, tmp_path, engine):
    result = run(small_config(tmp_path / "run", engine, model=str(source), steps=2, save_every=0))
    assert_carries(result.train.final_model, source)


def test_wise_ft_and_conversion_keep_them(source, tmp_path):
    assert_carries(wise_ft(source, source, 0.5, tmp_path / "wise"), source)
    mlx = convert(source, tmp_path / "mlx", to="mlx")
    assert_carries(mlx, source)
    assert_carries(convert(mlx, tmp_path / "hf", to="hf"), source)


def test_open_clip_normalisation_reaches_hf_folders_and_the_engines(source, tmp_path):
    """open_clip keeps mean/std in open_clip_config.json's preprocess_cfg, with no
    preprocessor_config.json: loading reads it there, and converting to HF writes it out."""
    oc = convert(source, tmp_path / "oc", to="open_clip")
    (oc / "preprocessor_config.json").unlink(missing_ok=True)
    assert json.loads((oc / "open_clip_config.json").read_text())["preprocess_cfg"]["mean"] == MEAN
    clip = load(oc, "torch")
    assert clip.mean == tuple(MEAN) and clip.std == tuple(STD)
    hf = convert(oc, tmp_path / "hf", to="hf")
    processor = transformers.CLIPImageProcessor.from_pretrained(hf)
    assert list(processor.image_mean) == MEAN and list(processor.image_std) == STD
