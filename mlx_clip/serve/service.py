"""The model behind the server: one engine, used from one thread, fed by two micro-batchers."""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_clip.api import CLIP, load
from mlx_clip.errors import MlxClipError
from mlx_clip.metrics import build_class_embeds, zero_shot_logits
from mlx_clip.serve.batching import MicroBatcher
from mlx_clip.serve.inputs import ApiError, Limits, image_pixels
from mlx_clip.serve.metrics import ServerMetrics

# One prompt per label unless a request names its own: each template multiplies the text work of
# a request whose labels are not cached yet.
DEFAULT_CLASSIFY_TEMPLATES = ("a photo of a {}.",)
# How many (labels, templates) classifiers are kept: a client usually asks the same labels again.
CLASSIFIER_CACHE = 64


@dataclass(frozen=True)
class ServeSettings:
    model: str
    backend: str = "mlx"
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    index: Path | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None


class ModelService:
    def __init__(self, settings: ServeSettings, metrics: ServerMetrics):
        self.settings, self.metrics = settings, metrics
        self.clip: CLIP | None = None
        self.index = None
        self.error: str | None = None
        # The engine is created and called from this one thread: neither engine is thread-safe, and
        # MLX keeps its default stream per thread.
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="mlxclip-engine")
        self.decode_pool = ThreadPoolExecutor(max(2, (os.cpu_count() or 2)), thread_name_prefix="mlxclip-decode")
        batching = dict(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms)
        self.decoding = 0  # image requests between arrival and their rows reaching the batcher
        self.images = MicroBatcher(self._encode_images, self.engine_thread, observe=metrics.observer("image"),
                                   expecting=lambda: self.decoding > 0, **batching)
        # Texts are tokenized on the event loop, so none is ever half-way: a text batch is what has
        # queued while the engine was busy.
        self.texts = MicroBatcher(self._encode_texts, self.engine_thread, observe=metrics.observer("text"),
                                  expecting=lambda: False, **batching)
        self._classifiers: OrderedDict[tuple, np.ndarray] = OrderedDict()

    # --- life cycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.clip is not None and self.error is None

    async def start(self) -> None:
        self.images.start()
        self.texts.start()
        try:
            await asyncio.get_running_loop().run_in_executor(self.engine_thread, self._load)
        except MlxClipError as err:  # reported by /health and the CLI, which then shuts down
            self.error = str(err)
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"

    def _load(self) -> None:
        s = self.settings
        clip = load(s.model, s.backend, device=s.device, dtype=s.dtype, allow_pickle=s.allow_pickle)
        if s.index is not None:
            from mlx_clip.index import ImageIndex

            self.index = ImageIndex.load(s.index, expect_model=clip.folder)
        self.clip = clip

    async def stop(self) -> None:
        await self.images.stop()
        await self.texts.stop()
        self.engine_thread.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def info(self) -> dict:
        clip = self.clip
        return {
            "model": self.settings.model,
            "engine": self.settings.backend,
            "ready": self.ready,
            "embedding_dim": clip.config.projection_dim if clip else None,
            "image_size": clip.image_size if clip else None,
            "context_length": self.context_length if clip else None,
            "batching": {"max_batch_size": self.settings.max_batch_size, "max_wait_ms": self.settings.max_wait_ms},
            "limits": self.settings.limits.describe(),
            "classify_templates": list(DEFAULT_CLASSIFY_TEMPLATES),
            "index": None if self.index is None else {"images": len(self.index)},
        }

    @property
    def context_length(self) -> int:
        return self.clip.config.text_config.max_position_embeddings

    # --- engine calls (engine thread) ---------------------------------------------------------
    def _encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.clip.engine.encode_images(pixels)

    def _encode_texts(self, ids: np.ndarray) -> np.ndarray:
        return self.clip.engine.encode_texts(self.clip.tokenizer.trim(ids))

    # --- requests (event loop) ----------------------------------------------------------------
    async def embed_images(self, blobs: list[tuple[str, bytes]]) -> np.ndarray:
        clip, limits = self.clip, self.settings.limits
        loop = asyncio.get_running_loop()

        def decode(name: str, data: bytes) -> np.ndarray:
            return image_pixels(data, name, image_size=clip.image_size, mean=clip.mean, std=clip.std,
                                max_pixels=limits.max_image_pixels, crop=clip.crop)

        self.decoding += 1
        try:
            pixels = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, decode, name, data)
                                            for name, data in blobs))
        finally:
            self.decoding -= 1
        return await self.images.submit(np.stack(pixels))

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(ids, tokens counted for usage); refuses over-long texts when truncation is off."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ApiError(422, "invalid_request", f"texts[{i}]: expected a string, got {type(text).__name__}")
        counts = self.clip.tokenizer.token_counts(texts)
        context = self.context_length
        if not self.settings.limits.truncate:
            for i, count in enumerate(counts):
                if count > context:
                    raise ApiError(422, "text_too_long", f"texts[{i}]: {count} tokens exceeds the model's "
                                   f"context of {context} (the server runs with --no-truncate)")
        return self.clip.tokenizer.encode(texts, context_length=context), sum(min(c, context) for c in counts)

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, int]:
        ids, tokens = self.tokenize(texts)
        return await self.texts.submit(ids), tokens

    async def classify(self, image: tuple[str, bytes], labels: list[str], templates: list[str] | None) -> dict:
        from mlx_clip.data.templates import check_templates, fill

        try:
            templates = check_templates(list(templates or DEFAULT_CLASSIFY_TEMPLATES))
        except MlxClipError as err:
            raise ApiError(422, "invalid_request", f"templates: {err}") from None
        key = (tuple(labels), tuple(templates))
        classifier = self._classifiers.get(key)
        if classifier is None:
            prompts = [fill(t, label) for label in labels for t in templates]
            embeds, _ = await self.embed_texts(prompts)
            classifier = build_class_embeds(embeds.reshape(len(labels), len(templates), -1))
            self._classifiers[key] = classifier
            while len(self._classifiers) > CLASSIFIER_CACHE:
                self._classifiers.popitem(last=False)
        self._classifiers.move_to_end(key)
        image_embed = await self.embed_images([image])
        logits = zero_shot_logits(image_embed, classifier)[0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(np.argmax(probs))
        return {"labels": labels, "probabilities": probs.tolist(), "best": labels[best]}

    def require_index(self):
        if self.index is None:
            raise ApiError(404, "no_index", "no index is served: start the server with --index INDEX_DIR "
                           "(built by `mlxclip index`)")
        return self.index

    async def search(self, query: np.ndarray, k: int) -> list[dict]:
        scores, rows = self.require_index().search(query[None], k)
        return [{"path": self.index.paths[r], "score": float(s)} for r, s in zip(rows[0], scores[0])]
