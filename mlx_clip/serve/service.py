"""The model behind the server: one engine, used from one thread, fed by two micro-batchers, and a
pool of threads for each request's CPU work, so that none of it runs on the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_clip.api import CLIP, load
from mlx_clip.errors import MlxClipError
from mlx_clip.evaluation.metrics import build_class_embeds, zero_shot_logits
from mlx_clip.serve.batching import MicroBatcher
from mlx_clip.serve.error_shapes import ApiError
from mlx_clip.serve.inputs import decode_base64_image, image_pixels
from mlx_clip.serve.limits import Limits
from mlx_clip.serve.server_metrics import ServerMetrics

# One prompt per label unless a request names its own: each template multiplies the text work of
# a request whose labels are not cached yet.
DEFAULT_CLASSIFY_TEMPLATES = ("a photo of a {}.",)
# How many (labels, templates) classifiers are kept, and how many rows in all (one per label): a
# client usually asks the same labels again, and a hostile one must not fill memory with new ones.
CLASSIFIER_CACHE = 64
CLASSIFIER_CACHE_ROWS = 16_384


@dataclass(frozen=True)
class ServeSettings:
    model: str
    backend: str = "mlx"
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    quantize: int | None = None  # bits of the MLX engine's quantized Linears; None: float
    max_num_patches: int | None = None  # NaFlex SigLIP 2's patch budget per image; None: the folder's
    index: Path | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    ui: bool = True  # the web page at / (`--no-ui` leaves only the API)


class ModelService:
    def __init__(self, settings: ServeSettings, metrics: ServerMetrics):
        self.settings, self.metrics = settings, metrics
        self.clip: CLIP | None = None
        self.index = None
        self.thumbnails = None
        self.error: str | None = None
        # The engine is created and called from this one thread: neither engine is thread-safe, and
        # MLX keeps its default stream per thread.
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="mlxclip-engine")
        # Everything else a request costs in CPU: parsing its body, base64, image decoding, tokenizing,
        # classifier arithmetic, search, encoding the answer. Threads, so a request's work runs
        # while the loop answers others (the tokenizer and image decoders let go of the GIL; what is
        # pure Python shares it in 5 ms turns).
        self.cpu_pool = ThreadPoolExecutor(max(2, (os.cpu_count() or 2)), thread_name_prefix="mlxclip-cpu")
        batching = dict(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms)
        # Requests between arrival and their rows reaching a batcher (decoding, tokenizing): a
        # batch waits up to max_wait_ms for them, and not at all when there are none.
        self.preparing = {"image": 0, "text": 0}
        self.images = MicroBatcher(self._encode_images, self.engine_thread, observe=metrics.observer("image"),
                                   expecting=lambda: self.preparing["image"] > 0, **batching)
        self.texts = MicroBatcher(self._encode_texts, self.engine_thread, observe=metrics.observer("text"),
                                  expecting=lambda: self.preparing["text"] > 0, **batching)
        self._classifiers: OrderedDict[str, np.ndarray] = OrderedDict()

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
        clip = load(s.model, s.backend, device=s.device, dtype=s.dtype, allow_pickle=s.allow_pickle,
                    quantize=s.quantize, max_num_patches=s.max_num_patches)
        if s.index is not None:
            from mlx_clip.index import ImageIndex

            from mlx_clip.serve.thumbnails import Thumbnails

            self.index = ImageIndex.load(s.index, expect_model=clip.folder, expect_budget=clip.max_num_patches)
            self.thumbnails = Thumbnails(self.index, s.limits.max_image_pixels)
        self.clip = clip

    async def stop(self) -> None:
        await self.images.stop()
        await self.texts.stop()
        self.engine_thread.shutdown(wait=False, cancel_futures=True)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    async def cpu(self, fn: Callable, *args):
        """`fn(*args)` in the CPU pool, awaited: the event loop stays free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    def info(self) -> dict:
        clip = self.clip
        return {
            "model": self.settings.model,
            "engine": self.settings.backend,
            # {"group_size", "bits"} of an MLX-quantized model (a quantized folder or --quantize), else None.
            "quantization": clip.config.quantization if clip else None,
            "ready": self.ready,
            "embedding_dim": clip.config.projection_dim if clip else None,
            "image_size": clip.image_size if clip else None,
            # NaFlex SigLIP 2: each image keeps its aspect ratio within this many patches (else None).
            "max_num_patches": clip.max_num_patches if clip else None,
            "context_length": self.context_length if clip else None,
            "batching": {"max_batch_size": self.settings.max_batch_size, "max_wait_ms": self.settings.max_wait_ms},
            "limits": self.settings.limits.describe(),
            "classify_templates": list(DEFAULT_CLASSIFY_TEMPLATES),
            "index": None if self.index is None else {"images": len(self.index),
                                                      "thumbnails": self.thumbnails.root is not None},
        }

    @property
    def context_length(self) -> int:
        return self.clip.config.text_config.max_position_embeddings

    # --- engine calls (engine thread) ---------------------------------------------------------
    def _encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return _in_bucket(self.clip.engine.encode_images, pixels)

    def _encode_texts(self, ids: np.ndarray) -> np.ndarray:
        return _in_bucket(self.clip.engine.encode_texts, self.clip.tokenizer.trim(ids))

    # --- requests (event loop; their work in the CPU pool) --------------------------------------
    async def embed_images(self, items: list[tuple[str, bytes | str]]) -> np.ndarray:
        """(name, bytes, or base64 / a data URI) per image -> (N, D) embeddings, in order."""
        clip, limits = self.clip, self.settings.limits

        def decode(name: str, data: bytes | str) -> np.ndarray:
            if isinstance(data, str):
                data = decode_base64_image(data, name)
            return image_pixels(data, name, processor=clip.processor, max_pixels=limits.max_image_pixels)

        self.preparing["image"] += 1
        try:
            pixels = await asyncio.gather(*(self.cpu(decode, name, data) for name, data in items))
        finally:
            self.preparing["image"] -= 1
        return await self.images.submit(np.stack(pixels))

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(ids, tokens counted for usage); refuses over-long texts when truncation is off. In the
        CPU pool: texts reach it bounded (`inputs.check_text`), and still cost milliseconds each."""
        counts = self.clip.tokenizer.token_counts(texts)
        context = self.context_length
        if not self.settings.limits.truncate:
            for i, count in enumerate(counts):
                if count > context:
                    raise ApiError(422, "text_too_long", f"texts[{i}]: {count} tokens exceeds the model's "
                                   f"context of {context} (the server runs with --no-truncate)")
        return self.clip.tokenizer.encode(texts, context_length=context), sum(min(c, context) for c in counts)

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Checked texts (`inputs.check_texts`) -> ((N, D) embeddings, tokens counted)."""
        self.preparing["text"] += 1
        try:
            ids, tokens = await self.cpu(self.tokenize, texts)
        finally:
            self.preparing["text"] -= 1
        return await self.texts.submit(ids), tokens

    async def classify(self, image: tuple[str, bytes | str], labels: list[str], templates: list[str]) -> dict:
        """Checked labels and templates (`inputs.check_labels`) -> a probability per label."""
        key, prompts = await self.cpu(_classifier_key_and_prompts, labels, templates)
        classifier = self._classifiers.get(key)
        if classifier is None:
            embeds, _ = await self.embed_texts(prompts)
            classifier = await self.cpu(build_class_embeds, embeds.reshape(len(labels), len(templates), -1))
            self._classifiers[key] = classifier
            while len(self._classifiers) > CLASSIFIER_CACHE or (
                    len(self._classifiers) > 1
                    and sum(len(c) for c in self._classifiers.values()) > CLASSIFIER_CACHE_ROWS):
                self._classifiers.popitem(last=False)
        self._classifiers.move_to_end(key)
        image_embed = await self.embed_images([image])
        probs = await self.cpu(_probabilities, image_embed, classifier)
        best = int(np.argmax(probs))
        return {"labels": labels, "probabilities": probs.tolist(), "best": labels[best]}

    def require_index(self):
        if self.index is None:
            raise ApiError(404, "no_index", "no index is served: start the server with --index INDEX_DIR "
                           "(built by `mlxclip index`)")
        return self.index

    async def search(self, query: np.ndarray, k: int) -> list[dict]:
        scores, rows = await self.cpu(self.require_index().search, query[None], k)
        # The row names the image to /v1/thumbnails/{row}, which reads no path a request names.
        return [{"path": self.index.paths[r], "score": float(s), "row": int(r)} for r, s in zip(rows[0], scores[0])]


def batch_bucket(rows: int) -> int:
    """The row count an engine call is padded to: 1, 2, then multiples of 4. A compiled engine
    (MLX) builds and keeps a graph and buffers for each input shape it meets, so a server meeting
    every batch size from 1 to --max-batch-size grew for as long as new sizes came (60 MB in a
    minute of mixed traffic); with buckets the shapes are few, for 3 padding rows at most."""
    return rows if rows <= 2 else -(-rows // 4) * 4


def _in_bucket(encode: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """`encode(rows)`, run on `rows` padded with copies of its last row to `batch_bucket` rows
    (each row's embedding depends on that row alone), the padding's output dropped."""
    pad = batch_bucket(len(rows)) - len(rows)
    if pad:
        rows = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])
    return encode(rows)[:len(rows) - pad]


def _classifier_key_and_prompts(labels: list[str], templates: list[str]) -> tuple[str, list[str]]:
    """A digest of (labels, templates), so a cached classifier keeps 64 bytes of its request rather
    than its labels; and the prompts, label-major as `build_class_embeds` reads them."""
    from mlx_clip.data.templates import fill

    key = hashlib.sha256(json.dumps([labels, templates]).encode()).hexdigest()
    return key, [fill(t, label) for label in labels for t in templates]


def _probabilities(image_embed: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    logits = zero_shot_logits(image_embed, classifier)[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()
