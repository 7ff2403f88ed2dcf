"""Test helpers: random-init reference models built with transformers (code we did not write)."""

from __future__ import annotations

import numpy as np


def hf_clip(seed: int = 0, text: dict | None = None, vision: dict | None = None, **top):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=text or {}, vision_config=vision or {}, **top)
    return transformers.CLIPModel._from_config(config, attn_implementation="sdpa").eval()


TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 hidden_act="quick_gelu")
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8, hidden_act="quick_gelu")


def tiny_hf_clip(seed: int = 0, hidden_act: str = "quick_gelu", **top):
    text = {**TINY_TEXT, "hidden_act": hidden_act}
    vision = {**TINY_VISION, "hidden_act": hidden_act}
    return hf_clip(seed, text, vision, projection_dim=top.pop("projection_dim", 16), **top)


def save_hf(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def random_tokens(rng: np.random.Generator, batch: int, vocab: int = 49408, length: int = 77,
                  eot: int = 49407, sot: int = 49406) -> np.ndarray:
    """SOT, random ids, EOT at a random position, zero padding after: what a CLIP tokenizer emits."""
    ids = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        end = int(rng.integers(2, length))
        ids[row, 0] = sot
        ids[row, 1:end] = rng.integers(1, min(vocab, sot), size=end - 1)
        ids[row, end] = eot
    return ids


def random_pixels(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    return rng.standard_normal((batch, size, size, 3)).astype(np.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def perturb(model, seed):
    """Random-init CLIPs have LayerNorm weights 1 and biases 0: move every parameter so that a
    misplaced or untransposed tensor cannot go unnoticed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def tensors_of(path) -> dict:
    """name -> torch tensor, read by the safetensors library (not our reader)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_bytes(a: dict, b: dict):
    import torch

    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].reshape(-1).view(torch.uint8).equal(b[name].reshape(-1).view(torch.uint8)), name


def open_clip_features(model, pixels_nhwc, ids, *, normalize: bool = True):
    """open_clip's own `encode_image` / `encode_text` of NHWC pixels and token ids (numpy)."""
    import torch

    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2), normalize=normalize)
        text = model.encode_text(torch.from_numpy(ids), normalize=normalize)
    return image.numpy(), text.numpy()


def hf_features(model, pixels_nhwc, ids, *, normalize: bool = True):
    """transformers' `get_image_features` / `get_text_features` (CLIPModel or SiglipModel)."""
    import torch

    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2))
        text = model.get_text_features(input_ids=torch.from_numpy(ids))
    image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
    if normalize:
        image, text = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    return image.numpy(), text.numpy()


def assert_refused(result, *needles, code: int = 2) -> str:
    """A CLI result refused as users see it: exit `code`, exactly one `error:` line holding every
    needle, no traceback. Returns that line."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
