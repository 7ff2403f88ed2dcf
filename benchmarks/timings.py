"""`python -m mlx_clip.benchmarks.timings`: how long the small fixed costs take — tokenizing 1000 captions,
rendering the built-in demo domain — on this machine. Kept out of the tests, where a loaded
machine made wall-clock bounds flaky; the tests check that these produce the right output."""

from __future__ import annotations

import mlx_clip  # noqa: F401  (the BLAS loader, as everywhere)

import random
import tempfile
import time
from pathlib import Path

WORDS = ("a photo of the red blue green small large dog cat car street night mountain city 東京 猫 🐱 "
         "x-ray sunny two three on in at near under with").split()


def tokenize_1000() -> float:
    from mlx_clip.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    rng = random.Random(1234)
    captions = [" ".join(rng.choices(WORDS, k=rng.randint(6, 20))) + "." for _ in range(1000)]
    tokenizer.encode(captions[:10])  # warm the backend
    start = time.perf_counter()
    tokenizer.encode(captions)
    return time.perf_counter() - start


def render_demo() -> float:
    from mlx_clip.data.demo import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_demo(Path(tmp) / "demo")
        return time.perf_counter() - start


def main() -> None:
    print(f"tokenize 1000 captions: {tokenize_1000() * 1000:.0f} ms")
    print(f"render the demo domain: {render_demo():.1f} s")


if __name__ == "__main__":
    main()
