"""Write a checkpoint folder in one of the three formats from HF-named, torch-layout tensors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clip.convert import detect, open_clip_siglip
from mlx_clip.convert.dtypes import TAG_NAMES, cast, from_numpy, to_numpy
from mlx_clip.convert.layout import torch_to_mlx
from mlx_clip.convert.names import hf_to_open_clip, rules
from mlx_clip.convert.open_clip_config import layout_of, open_clip_config_for
from mlx_clip.convert.safetensors_io import FLOAT_TAGS, Tensor, write_safetensors
from mlx_clip.model.config import CLIPConfig
from mlx_clip.errors import ConvertError
from mlx_clip.model.image_processing import OPENAI_MEAN, OPENAI_STD, SIGLIP_MEAN, SIGLIP_STD
from mlx_clip.version import __version__

# Files that travel with the weights (tokenizer and image preprocessing), copied as they are.
SIDE_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
              "special_tokens_map.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def mlx_metadata() -> dict[str, str]:
    return {"format": "mlx", "mlxclip_version": __version__}


def write_stored(folder: str | Path, to: str, config: CLIPConfig, tensors: dict[str, Tensor],
                 extra_tensors: dict[str, Tensor] | None = None,
                 preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Write `tensors` (HF names, torch layout, stored dtypes) as a `to` checkpoint in `folder`."""
    if to == "open_clip" and config.is_naflex:
        raise ConvertError("--to open_clip: open_clip has no NaFlex SigLIP 2 model (variable aspect ratio, "
                           "model_type 'siglip2'); convert it to hf (transformers' Siglip2Model) or mlx")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra_tensors = extra_tensors or {}
    if to == "open_clip" and config.is_siglip:
        _write_open_clip_siglip(folder, config, tensors, preprocess_cfg)
    elif to == "open_clip":
        _write_open_clip(folder, config, tensors, extra_tensors, preprocess_cfg)
    elif to in ("mlx", "hf"):
        _with_dtype(config, tensors).save(folder)
        if to == "mlx":
            tensors = {n: t.with_array(torch_to_mlx(n, t.array)) for n, t in tensors.items()}
        metadata = mlx_metadata() if to == "mlx" else {"format": "pt"}
        write_safetensors(folder / detect.SAFETENSORS, {**tensors, **extra_tensors}, metadata)
    else:
        raise ConvertError(f"format must be one of {', '.join(detect.FORMATS)}, got {to!r}")
    return folder


def write_checkpoint(folder: str | Path, config: CLIPConfig, tensors: dict[str, np.ndarray], *,
                     to: str = "mlx", dtype: str | None = None) -> Path:
    """Write numpy tensors (HF names, torch layout) as a checkpoint; `dtype` casts floats
    (bf16 with round-to-nearest-even)."""
    stored = {n: cast(from_numpy(a), dtype) for n, a in tensors.items()}
    return write_stored(folder, to, config, stored)


def write_model_folder(folder: Path, config: CLIPConfig, tensors: dict[str, np.ndarray], *, to: str = "hf",
                       source: Path | None = None) -> Path:
    """A complete model folder: config.json and weights (`to` format), tokenizer files and
    preprocessor config, so that both engines (and transformers, for "hf") load it as it is."""
    write_checkpoint(folder, config, tensors, to=to)
    write_side_files(folder, config, source)
    return folder


def write_side_files(folder: Path, config: CLIPConfig, source: Path | None = None) -> None:
    """CLIP: OpenAI's tokenizer files and a preprocessor config for the model's image size.
    SigLIP: the tokenizer and preprocessor files of `source` (the folder the model came from: a
    SigLIP tokenizer cannot be made up), and SigLIP's preprocessor config where it has none."""
    copied = copy_side_files(source, folder) if source is not None and Path(source).is_dir() else []
    if config.is_naflex:  # no image size to fit: each image is sized by its patch budget
        if "preprocessor_config.json" not in copied:
            write_naflex_preprocessor_config(folder, config.vision_config.patch_size, config.vision_config.num_patches)
        return
    if "preprocessor_config.json" in copied:
        fit_preprocessor_size(folder / "preprocessor_config.json", config.vision_config.image_size)
    if config.is_siglip:
        if "preprocessor_config.json" not in copied:
            write_preprocessor_config(folder, config.vision_config.image_size, siglip=True)
        return
    # CLIP: what the source model was trained with travels; OpenAI's files only where it had none.
    if not any(name in copied for name in TOKENIZER_FILES):
        from mlx_clip.model.tokenizer import load_tokenizer

        load_tokenizer().save_pretrained(folder)
    if "preprocessor_config.json" not in copied:
        write_preprocessor_config(folder, config.vision_config.image_size, **open_clip_normalisation(config))


def fit_preprocessor_size(path: Path, image_size: int) -> None:
    """A copied preprocessor config, resized for a model now at `image_size` (`--image-size`):
    its resize and crop sizes, whichever forms they take, become the model's size."""
    data = json.loads(path.read_text())

    def fitted(size):
        if isinstance(size, dict):
            return {k: (image_size if k in ("shortest_edge", "height", "width") else v) for k, v in size.items()}
        return image_size if isinstance(size, int) else size

    changed = {k: fitted(data[k]) for k in ("size", "crop_size") if k in data}
    if any(changed[k] != data[k] for k in changed):
        path.write_text(json.dumps({**data, **changed}, indent=2) + "\n")


def open_clip_normalisation(config: CLIPConfig) -> dict[str, list[float]]:
    """{mean, std} from the open_clip preprocess_cfg a config came with (open_clip checkpoints carry
    their normalisation there, not in a preprocessor_config.json), else {}."""
    from mlx_clip.convert.open_clip_config import EXTRAS_KEY

    original = config.extras.get(EXTRAS_KEY)
    cfg = original.get("preprocess_cfg") if isinstance(original, dict) else None
    if not isinstance(cfg, dict):
        return {}
    return {k: [float(v) for v in cfg[k]] for k in ("mean", "std")
            if isinstance(cfg.get(k), (list, tuple)) and len(cfg[k]) == 3}


def open_clip_crops(config: CLIPConfig) -> bool:
    """Whether the open_clip preprocess_cfg a config came with resizes the shortest side and crops
    (`resize_mode` 'shortest') rather than squashing to a square, as open_clip's SigLIP configs do."""
    from mlx_clip.convert.open_clip_config import EXTRAS_KEY

    original = config.extras.get(EXTRAS_KEY)
    cfg = original.get("preprocess_cfg") if isinstance(original, dict) else None
    return isinstance(cfg, dict) and cfg.get("resize_mode") == "shortest"


def write_preprocessor_config(folder: Path, image_size: int, *, siglip: bool = False,
                              mean: list[float] | None = None, std: list[float] | None = None) -> None:
    if siglip:
        # SiglipImageProcessor: a square bicubic resize, no crop, mean = std = 0.5 unless given.
        processor = {
            "image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean or SIGLIP_MEAN),
            "image_std": list(std or SIGLIP_STD), "do_convert_rgb": True,
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        return
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean or OPENAI_MEAN), "image_std": list(std or OPENAI_STD), "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def write_naflex_preprocessor_config(folder: Path, patch_size: int, max_num_patches: int) -> None:
    """`Siglip2ImageProcessor`'s file as google/siglip2-*-naflex ship it: a bilinear resize to the
    patch budget, mean = std = 0.5. The budget defaults to the position grid's patch count."""
    processor = {
        "image_processor_type": "Siglip2ImageProcessor", "do_resize": True, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(SIGLIP_MEAN),
        "image_std": list(SIGLIP_STD), "do_convert_rgb": True, "patch_size": patch_size,
        "max_num_patches": max_num_patches,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _with_dtype(config: CLIPConfig, tensors: dict[str, Tensor]) -> CLIPConfig:
    """transformers records the weights' dtype in config.json (`dtype`, formerly `torch_dtype`)."""
    tags = Counter(t.dtype for t in tensors.values() if t.dtype in FLOAT_TAGS)
    if not tags:
        return config
    name = TAG_NAMES[tags.most_common(1)[0][0]]
    extras = dict(config.extras)
    for key in [k for k in ("dtype", "torch_dtype") if k in extras] or ["dtype"]:
        extras[key] = name
    return dataclasses.replace(config, extras=extras)


def _write_open_clip(folder: Path, config: CLIPConfig, tensors: dict[str, Tensor],
                     extra_tensors: dict[str, Tensor], preprocess_cfg: dict[str, Any] | None) -> None:
    bias = extra_tensors.get("logit_bias")
    bias_value = float(to_numpy(bias).reshape(-1)[0]) if bias is not None else None
    data = open_clip_config_for(config, bias_value, preprocess_cfg)
    layout = layout_of(data["model_cfg"])
    table = rules(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers,
                  text_prefix=layout.text_prefix, logit_scale_shape=layout.logit_scale_shape)
    out = hf_to_open_clip(tensors, table)
    if bias is not None:
        out["logit_bias"] = bias.with_array(bias.array.reshape(layout.logit_scale_shape))
    (folder / detect.OPEN_CLIP_CONFIG).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    write_safetensors(folder / detect.OPEN_CLIP_SAFETENSORS, out, {"format": "pt"})


def _write_open_clip_siglip(folder: Path, config: CLIPConfig, tensors: dict[str, Tensor],
                            preprocess_cfg: dict[str, Any] | None) -> None:
    """open_clip's SigLIP layout: a named timm trunk (`convert/open_clip_siglip.py`)."""
    bias = float(to_numpy(tensors["logit_bias"]).reshape(-1)[0])
    data = open_clip_siglip.open_clip_config_for(config, bias, preprocess_cfg)
    layout = layout_of(data["model_cfg"])
    table = open_clip_siglip.rules(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers,
                                   text_prefix=layout.text_prefix, logit_scale_shape=layout.logit_scale_shape)
    out = open_clip_siglip.hf_to_open_clip(tensors, table)
    (folder / detect.OPEN_CLIP_CONFIG).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    write_safetensors(folder / detect.OPEN_CLIP_SAFETENSORS, out, {"format": "pt"})


def copy_side_files(src: Path, dst: Path) -> list[str]:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return [name for name in SIDE_FILES if (src / name).is_file()]
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
