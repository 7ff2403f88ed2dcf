"""`mlxclip export MODEL --to onnx OUT_DIR`: the image and text encoders as two ONNX graphs.

`mlxclip export MODEL --to onnx OUT_DIR` loads MODEL (a folder in any supported format, a built-in
name or a hub id) into the torch engine and writes `image_encoder.onnx` (pixel_values: float32
(batch, H, W, 3), channels-last and already normalised, exactly what `mlx_clip.load(...).preprocess`
returns) and `text_encoder.onnx` (input_ids: int64 (batch, sequence), sequence up to the model's
context, SOT ... EOT then padding as `mlx_clip.model.tokenizer` writes it; no attention mask), each
returning the engine's L2-normalised embeddings. A NaFlex SigLIP 2 model's image graph takes its
packed patches instead: pixel_values float32 (batch, patches, p*p*3 + 3) as
`mlx_clip.model.naflex.NaflexProcessor` makes them, the patch count dynamic too (the processor
pads to preprocessor_config.json's max_num_patches). Beside them go the model's tokenizer files,
preprocessor_config.json and `onnx_export.json`, which describes the inputs, the outputs, the
logit scale and the verification. The graphs are traced on a batch of 2 with a dynamic batch axis
and are kept only if onnxruntime, run on a different batch size (and on a short text length),
gives the torch engine's embeddings within 1e-5; otherwise OUT_DIR is left untouched. A non-empty
OUT_DIR is refused unless `--overwrite`. Needs `pip install 'mlxclip[export]'` (onnx,
onnxruntime, onnxscript).
"""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clip.convert.converter import check_destination
from mlx_clip.outputs import move_into_place, staging_folder
from mlx_clip.convert.writer import copy_side_files, write_naflex_preprocessor_config, write_preprocessor_config
from mlx_clip.api import CLIP, load, resolve
from mlx_clip.conversion import VERIFY_SEED, verify_batch
from mlx_clip.errors import ConfigError, ConvertError
from mlx_clip.version import __version__

# torch's dynamo exporter builds opset 18 and later natively; an older target goes through onnx's
# version converter, which fails on these graphs (Reduce* axes given as inputs). 18 is the oldest,
# so the one most runtimes load.
OPSET = 18
MIN_OPSET = 18
EXPORT_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch.onnx's dynamo exporter
IMAGE_FILE, TEXT_FILE, SPEC_FILE = "image_encoder.onnx", "text_encoder.onnx", "onnx_export.json"
# The trace batch and the verification batch differ, so verification proves the batch axis dynamic.
TRACE_BATCH, VERIFY_BATCH = 2, 3
SHORT_TEXT = 8  # a second, trimmed text length (as `tokenizer.trim_padding` makes), for the dynamic axis
# NaFlex: a second patch count, this many padding rows past the traced one, for the dynamic axis.
EXTRA_PATCHES = 5
# max |onnxruntime - torch| on L2-normalised float32 embeddings: both run the same float32 ops and
# differ only in summation order and fused kernels (~1e-7 measured); a wrong layout, pooling
# position or weight moves entries by ~1e-1.
TOLERANCE = 1e-5


def export_onnx(model: str | Path, out_dir: str | Path, *, overwrite: bool = False, allow_pickle: bool = False,
                opset: int = OPSET) -> Path:
    """Export `model` (folder, built-in name or hub id) to `out_dir` as two verified ONNX graphs
    plus tokenizer and preprocessing files. Returns `out_dir`."""
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"--opset must be an integer >= {MIN_OPSET} (torch's ONNX exporter writes no older "
                          f"opset), got {opset!r}")
    require_export_packages()
    out = Path(out_dir)
    check_destination(Path(model), out, overwrite)  # before resolving, so a refused hub id downloads nothing
    clip = load(resolve(model, allow_pickle=allow_pickle), backend="torch", device="cpu", allow_pickle=allow_pickle)
    pixels, token_ids = verify_batch(clip.config, TRACE_BATCH, seed=VERIFY_SEED)
    staging = staging_folder(out)
    try:
        facts = clip.engine.export_onnx(staging, pixels, token_ids, opset=opset, image_file=IMAGE_FILE,
                                        text_file=TEXT_FILE)
        written = graph_opsets(staging)
        if set(written.values()) != {opset}:
            raise ConvertError(f"torch.onnx wrote opsets {written}, asked for {opset}")
        write_side_files(clip, staging)
        try:
            diffs = verify_onnx(clip, staging)
        except ConvertError as err:
            raise ConvertError(f"{model} -> {out}: {err}; {out} left untouched") from None
        spec = describe(clip, opset=opset, diffs=diffs, **facts)
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def require_export_packages() -> None:
    missing = [name for name in EXPORT_PACKAGES if find_spec(name) is None]
    if missing:
        raise ConvertError(f"exporting to ONNX needs {', '.join(missing)} (not installed): "
                           "pip install 'mlxclip[export]'")


def graph_opsets(folder: Path) -> dict[str, int]:
    """The default-domain opset of each graph written in `folder`."""
    import onnx

    opsets = {}
    for file in (IMAGE_FILE, TEXT_FILE):
        proto = onnx.load(str(folder / file), load_external_data=False)
        opsets[file] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
    return opsets


def write_side_files(clip: CLIP, folder: Path) -> None:
    """The model folder's tokenizer and preprocessor files; where it has none, the files of the
    tokenizer and image statistics `mlx_clip.load` falls back to, so the export is complete."""
    copied = set(copy_side_files(clip.folder, folder))
    if "tokenizer.json" not in copied and not {"vocab.json", "merges.txt"} <= copied:
        clip.tokenizer.save_pretrained(folder)
    if "preprocessor_config.json" in copied:
        return
    if clip.config.is_naflex:
        write_naflex_preprocessor_config(folder, clip.config.vision_config.patch_size, clip.max_num_patches)
    else:
        write_preprocessor_config(folder, clip.image_size)


def verify_onnx(clip: CLIP, folder: Path) -> dict[str, float]:
    """Run both graphs in onnxruntime on a seeded batch of VERIFY_BATCH (texts at the full context
    and at SHORT_TEXT tokens; NaFlex images also with EXTRA_PATCHES more padding rows) and compare
    with the torch engine; the max |difference| per tower, or ConvertError past TOLERANCE."""
    context = clip.config.text_config.max_position_embeddings
    pixels, token_ids = verify_batch(clip.config, VERIFY_BATCH, seed=VERIFY_SEED + 1)
    _, short_ids = verify_batch(clip.config, VERIFY_BATCH, seed=VERIFY_SEED + 2, length=min(SHORT_TEXT, context))
    images = (pixels, padded(pixels, pixels.shape[1] + EXTRA_PATCHES)) if clip.config.is_naflex else (pixels,)
    checks = (("image", IMAGE_FILE, "pixel_values", images, clip.engine.encode_images),
              ("text", TEXT_FILE, "input_ids", (token_ids, short_ids), clip.engine.encode_texts))
    diffs = {}
    for kind, file, input_name, batches, reference in checks:
        session = onnx_session(folder / file)
        worst = 0.0
        for inputs in batches:
            got = run_session(session, input_name, inputs, file)
            want = reference(inputs)
            if got.shape != want.shape:
                raise ConvertError(f"verification failed: onnxruntime gave {kind} embeddings of shape {got.shape} "
                                   f"for a batch of {inputs.shape}, the torch engine {want.shape}")
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            if not diff <= TOLERANCE:
                raise ConvertError(f"verification failed: onnxruntime's {kind} embeddings differ by {diff:.2e} "
                                   f"from the torch engine's on inputs {inputs.shape} (tolerance {TOLERANCE:.0e})")
            worst = max(worst, diff)
        diffs[kind] = worst
    return diffs


def padded(packed: np.ndarray, length: int) -> np.ndarray:
    """Packed NaFlex images (`naflex.pack`) with their patches padded to `length` rows."""
    from mlx_clip.model.naflex import pack, stack_patches, unpack

    values, mask, shapes = unpack(packed)
    patches = [rows[:count] for rows, count in zip(values, mask.sum(axis=1))]
    return pack(stack_patches(patches, [tuple(s) for s in shapes.tolist()], length))


def onnx_session(path: Path):
    """An onnxruntime CPU session for `path`; ConvertError if onnxruntime cannot load it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the CLI's output stays one line
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's pybind errors share no useful base class
        raise ConvertError(f"onnxruntime cannot load {path.name}: {type(err).__name__}: {_first_line(err)}") from err


def run_session(session, input_name: str, inputs: np.ndarray, file: str) -> np.ndarray:
    try:
        return np.asarray(session.run(None, {input_name: inputs})[0])
    except Exception as err:
        raise ConvertError(f"onnxruntime failed to run {file} on inputs {inputs.shape}: {type(err).__name__}: "
                           f"{_first_line(err)}") from err


def describe(clip: CLIP, *, opset: int, diffs: dict[str, float], exporter: str, logit_scale: float) -> dict[str, Any]:
    """What a consumer of the graphs needs: inputs (layout, dtype, axes), outputs, the logit scale."""
    cfg, t = clip.config, clip.config.text_config
    if cfg.is_siglip:
        pooling = "last position"
        padding = ("the model's tokenizer pads every row to max_sequence with its pad id: SigLIP reads every "
                   "position and pools the last, so give texts exactly as the tokenizer makes them")
    else:
        pooling = ("argmax(input_ids) (legacy eos_token_id 2)" if t.eos_token_id == 2
                   else f"first position of eos_token_id {t.eos_token_id}")
        padding = ("<|startoftext|> tokens <|endoftext|>, then pad id 0 (mlx_clip.model.tokenizer) or "
                   "<|endoftext|> (transformers): attention is causal and pooling reads the first EOT, so "
                   "nothing after it changes the output")
    return {
        "format": "onnx",
        "mlxclip_version": __version__,
        "exporter": exporter,
        "opset": opset,
        "source": str(clip.folder),
        "image_encoder": {
            "file": IMAGE_FILE,
            "input": image_input(clip),
            "output": {"name": "image_embeds", "dtype": "float32", "shape": ["batch", cfg.projection_dim],
                       "l2_normalized": True},
        },
        "text_encoder": {
            "file": TEXT_FILE,
            "input": {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"],
                      "max_sequence": t.max_position_embeddings, "attention_mask": None, "padding": padding,
                      "pooling": pooling},
            "output": {"name": "text_embeds", "dtype": "float32", "shape": ["batch", cfg.projection_dim],
                       "l2_normalized": True},
        },
        # logits = exp(logit_scale) * image_embeds @ text_embeds.T, as CLIP computes them
        "logit_scale": logit_scale,
        "verification": {"reference": "mlxclip torch engine (float32, CPU)", "batch": VERIFY_BATCH,
                         "trace_batch": TRACE_BATCH, "max_abs_diff": diffs, "tolerance": TOLERANCE},
    }


def image_input(clip: CLIP) -> dict[str, Any]:
    """The image graph's input: square pixels, or NaFlex's packed patches."""
    stats = {"image_mean": list(clip.mean), "image_std": list(clip.std)}
    if not clip.config.is_naflex:
        size = clip.image_size
        return {"name": "pixel_values", "dtype": "float32", "shape": ["batch", size, size, 3], "layout": "NHWC",
                "preprocessing": "resize (shortest edge, bicubic), center crop, scale to [0, 1], then "
                                 "(x - image_mean) / image_std from preprocessor_config.json, channels last", **stats}
    v = clip.config.vision_config
    return {"name": "pixel_values", "dtype": "float32", "shape": ["batch", "patches", v.patch_dim + 3],
            "layout": "packed NaFlex patches (mlx_clip.model.naflex.pack)",
            "columns": f"{v.patch_dim} normalised values of a {v.patch_size}x{v.patch_size} patch flattened as "
                       "(row, column, channel), then 1 for a real patch or 0 for padding, then the image's patch "
                       "rows and columns (the same on each of its rows)",
            "patch_size": v.patch_size, "max_num_patches": clip.max_num_patches,
            "preprocessing": "resize (bilinear) to the multiples of patch_size that keep the aspect ratio within "
                             "max_num_patches patches, scale to [0, 1], (x - image_mean) / image_std, cut into "
                             "patches row by row, pad with zero rows to the batch's patch count "
                             "(Siglip2ImageProcessor; mlx_clip.model.naflex.NaflexProcessor)",
            "grids": "each image's rows * cols must be between 1 and the patch count: the graph does not check",
            **stats}


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
