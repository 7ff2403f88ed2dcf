"""What one request may ask of the server. Every default of `mlxclip serve`'s limits lives here
once; the CLI options take theirs from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2 ** 20
    max_items: int = 64
    max_labels: int = 1000
    # Labels x templates: every prompt is a text the engine embeds before one image is classified,
    # so this bounds the text work of one /v1/classify (1000 labels x 4 templates; ImageNet's 1000
    # classes with the 80 published templates would hold the engine for minutes).
    max_prompts: int = 4096
    max_k: int = 1000
    max_image_pixels: int = 40_000_000
    # Characters per text (texts, labels, templates, a search query). CLIP reads 77 tokens, about
    # 300 characters of English; 4096 keeps long captions, and scripts that need more characters
    # per token, while bounding the tokenizer's work before any is done: it grows with the text
    # (a few ms at this size, a minute for 16 texts of 100,000 words).
    max_text_chars: int = 4096
    max_concurrent_requests: int = 64
    truncate: bool = True

    @property
    def max_list(self) -> int:
        """The longest list any request may hold (texts, images, inputs, labels, templates)."""
        return max(self.max_items, self.max_labels)

    def describe(self) -> dict:
        return {"max_body_mb": self.max_body_bytes / 2 ** 20, "max_items": self.max_items,
                "max_labels": self.max_labels, "max_prompts": self.max_prompts, "max_k": self.max_k,
                "max_image_pixels": self.max_image_pixels, "max_text_chars": self.max_text_chars,
                "max_concurrent_requests": self.max_concurrent_requests, "truncate": self.truncate}
