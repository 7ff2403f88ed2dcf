"""The torch half of `mlxclip export --to onnx` (`mlx_clip/export.py`): the two towers of a
`transformers.CLIPModel` (`SiglipModel`, `Siglip2Model`), each wrapped to return what
`TorchBackend.encode_images/encode_texts` return (L2-normalised projections), exported by
`torch.onnx.export(dynamo=True)`.

The graphs take what the engine takes: pixels channels-last (B, H, W, 3), already normalised, and
permuted to NCHW inside the graph as `encode_images` does; token ids (B, L) int64 and nothing
else, since the engine passes no attention mask (CLIP: attention is causal and pooling reads the
first EOT, so padding after it never reaches the output; SigLIP reads every position). The batch
axis and the text length are dynamic; the image size is the model's own (the engine's position
interpolation is not exported).

NaFlex SigLIP 2 takes its packed patches (B, L, p*p*3 + 3) (`mlx_clip.model.naflex.pack`),
unpacked inside the graph as the engine unpacks them. Its position table is resized to each
image's grid by transformers as one matmul with weights computed from the grid sizes (no
data-dependent shapes), so the graph serves any grids, and L, the patch count, is dynamic too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlx_clip.errors import ConvertError
from mlx_clip.torch_backend.lora import merged
from mlx_clip.torch_backend.model import image_features

# transformers' switch for its in-graph input checks (`torch_compilable_check`).
TRANSFORMERS_CHECKS_OFF = "TRANSFORMERS_DISABLE_TORCH_CHECK"
# onnxscript's optimizer warns, through logging's last-resort handler onto the CLI's stderr, that it
# leaves a Split of several outputs unfolded (SigLIP's pooling head splits its fused in_proj):
# nothing the user can act on, and the graph is verified anyway.
ONNXSCRIPT_FOLDING_LOGGER = "onnxscript.optimizer._constant_folding"


class ImageEncoder(torch.nn.Module):
    """(B, H, W, 3) normalised float32 pixels, or NaFlex's packed patches (B, L, p*p*3 + 3) ->
    (B, P) L2-normalised image embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.model.config.model_type == "siglip2":  # packed NaFlex patches, unpacked as the engine does
            features = image_features(self.model, pixel_values).pooler_output
        else:
            features = self.model.get_image_features(pixel_values=pixel_values.permute(0, 3, 1, 2)).pooler_output
        return features / features.norm(dim=-1, keepdim=True)


class TextEncoder(torch.nn.Module):
    """(B, L) int64 token ids -> (B, P) L2-normalised text embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        features = self.model.get_text_features(input_ids=input_ids).pooler_output
        return features / features.norm(dim=-1, keepdim=True)


def export_towers(model, folder: Path, pixels: np.ndarray, token_ids: np.ndarray, *, opset: int,
                  image_file: str, text_file: str) -> dict[str, Any]:
    """Write `folder/image_file` and `folder/text_file`, traced on the example batch (`pixels`
    (B,H,W,3) float32 or NaFlex's packed (B,L,p*p*3+3), `token_ids` (B,L) int64, L the full
    context). Returns facts for the export's description: the exporter, and the model's logit
    scale (log) for zero-shot logits."""
    model = merged(model).eval()
    device = next(model.parameters()).device
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("sequence", min=2, max=token_ids.shape[1])
    naflex = model.config.model_type == "siglip2"
    image_axes = {0: batch, 1: torch.export.Dim("patches", min=1)} if naflex else {0: batch}
    towers = (
        ("image", ImageEncoder(model), "pixel_values", torch.from_numpy(pixels), image_axes, "image_embeds",
         image_file),
        ("text", TextEncoder(model), "input_ids", torch.from_numpy(token_ids), {0: batch, 1: length}, "text_embeds",
         text_file),
    )
    for kind, module, input_name, example, axes, output_name, file in towers:
        try:
            with torch.no_grad(), transformers_checks_off(), folding_warnings_off():
                program = torch.onnx.export(
                    module.eval(), (example.to(device),), dynamo=True, opset_version=opset, verbose=False,
                    input_names=[input_name], output_names=[output_name], dynamic_shapes={input_name: axes})
            # One self-contained file; torch writes the weights beside it only past protobuf's 2 GB.
            program.save(str(folder / file), external_data=False)
        except Exception as err:  # torch.onnx raises many types; the user gets one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConvertError(f"torch.onnx could not export the {kind} encoder: "
                               f"{type(err).__name__}: {first}") from err
    return {"exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "logit_scale": float(model.logit_scale.detach().float().cpu())}


@contextlib.contextmanager
def transformers_checks_off() -> Iterator[None]:
    """transformers checks some inputs inside the graph (Siglip2's grid sizes against the patch
    count), as `aten._is_all_true` assertions, which torch.onnx cannot translate and an ONNX graph
    could not raise anyway; they are switched off while tracing and restored after."""
    before = os.environ.get(TRANSFORMERS_CHECKS_OFF)
    os.environ[TRANSFORMERS_CHECKS_OFF] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRANSFORMERS_CHECKS_OFF, None)
        else:
            os.environ[TRANSFORMERS_CHECKS_OFF] = before


@contextlib.contextmanager
def folding_warnings_off() -> Iterator[None]:
    """onnxscript's constant-folding warnings (ONNXSCRIPT_FOLDING_LOGGER) muted while exporting."""
    logger = logging.getLogger(ONNXSCRIPT_FOLDING_LOGGER)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)
