"""The torch half of `mlxclip export --to onnx` (`mlx_clip/export.py`): the two towers of a
`transformers.CLIPModel`, each wrapped to return what `TorchBackend.encode_images/encode_texts`
return (L2-normalised projections), exported by `torch.onnx.export(dynamo=True)`.

The graphs take what the engine takes: pixels channels-last (B, H, W, 3), already normalised, and
permuted to NCHW inside the graph as `encode_images` does; token ids (B, L) int64 and nothing
else, since the engine passes no attention mask (attention is causal and pooling reads the first
EOT, so padding after it never reaches the output). The batch axis and the text length are
dynamic; the image size is the model's own (the engine's position interpolation is not exported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlx_clip.errors import ConvertError
from mlx_clip.torch_backend.lora import merged


class ImageEncoder(torch.nn.Module):
    """(B, H, W, 3) normalised float32 pixels -> (B, P) L2-normalised image embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
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
    (B,H,W,3) float32, `token_ids` (B,L) int64, L the full context). Returns facts for the
    export's description: the exporter, and the model's logit scale (log) for zero-shot logits."""
    model = merged(model).eval()
    device = next(model.parameters()).device
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("sequence", min=2, max=token_ids.shape[1])
    towers = (
        ("image", ImageEncoder(model), "pixel_values", torch.from_numpy(pixels), {0: batch}, "image_embeds",
         image_file),
        ("text", TextEncoder(model), "input_ids", torch.from_numpy(token_ids), {0: batch, 1: length}, "text_embeds",
         text_file),
    )
    for kind, module, input_name, example, axes, output_name, file in towers:
        try:
            with torch.no_grad():
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
