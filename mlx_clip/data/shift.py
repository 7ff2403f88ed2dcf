"""The two rendered domains of the domain-shift case (`mlxclip demo domain-shift`), no downloads.

Layout under `root`:

```
domain_shift.json                 parameters; a matching, complete one means "reuse"
a/train|val/<colour>_<shape>/NNNN.png     domain A: the demo's coloured shapes (12 classes)
b/train|val/<colour>_<pattern>/NNNN.png   domain B: stripes and dots in four other colours (16 classes)
```

Domain A is what the stand-in "pretrained" model learns first; domain B is what it is then
fine-tuned on. They share nothing a class name could carry over — other colour words, textures
instead of outlined objects — so what B's fine-tuning does to A is forgetting, measured on A's
held-out images. Pictures come from `demo.py`'s renderers with their own seeds: every image draws
from a generator seeded by (seed, domain, split, class, index), so the bytes depend only on the
parameters.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_clip.data.demo import control_classes, pattern_image, save_png, shape_image, target_classes
from mlx_clip.errors import ConfigError, DataError

SHIFT_VERSION = 1  # bump when the pictures change, so old folders are regenerated
MANIFEST = "domain_shift.json"
_DOMAINS = {"a": 2, "b": 3}  # generator ids beside the demo's 0 (target) and 1 (control)
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ShiftParams:
    image_size: int
    per_class_train: int
    per_class_val: int
    seed: int
    version: int = SHIFT_VERSION

    def check(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"domain-shift image_size must be in [16, 1024], got {self.image_size}")
        for name in ("per_class_train", "per_class_val"):
            if getattr(self, name) < 1:
                raise ConfigError(f"domain-shift {name} must be >= 1, got {getattr(self, name)}")


def domain_classes(domain: str) -> list[str]:
    return target_classes() if domain == "a" else control_classes()


def _render(domain: str, name: str, size: int, rng):
    colour, kind = name.split("_", 1)
    if domain == "a":
        return shape_image(rng, size, colour, kind)[0]
    return pattern_image(rng, size, colour, kind)


def make_shift_domains(root: str | Path, *, image_size: int = 64, per_class_train: int = 80,
                       per_class_val: int = 20, seed: int = 0) -> dict[str, Path]:
    """Render both domains under `root` (or reuse a complete one with the same parameters).
    Returns {"root", "a", "a_val", "b", "b_val"}."""
    import numpy as np

    root = Path(root).expanduser().resolve()
    params = ShiftParams(image_size, per_class_train, per_class_val, seed)
    params.check()
    paths = {"root": root, "a": root / "a", "a_val": root / "a" / "val", "b": root / "b", "b_val": root / "b" / "val"}
    manifest = _read_manifest(root)
    if manifest and manifest.get("params") == asdict(params) and manifest.get("status") == "complete":
        return paths
    if root.exists() and manifest is None and any(root.iterdir()):
        raise DataError(f"{root}: folder is not empty and holds no {MANIFEST}; give a new or empty folder")
    for domain in _DOMAINS:
        shutil.rmtree(root / domain, ignore_errors=True)
    _write_manifest(root, {"status": "building", "params": asdict(params)})
    for domain, domain_id in _DOMAINS.items():
        for split, count in (("train", per_class_train), ("val", per_class_val)):
            for label, name in enumerate(domain_classes(domain)):
                folder = root / domain / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, domain_id, _SPLITS[split], label, i])
                    save_png(_render(domain, name, image_size, rng), folder / f"{i:04d}.png")
    _write_manifest(root, {"status": "complete", "params": asdict(params)})
    return paths


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(root: Path, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": "mlxclip-domain-shift", **data}, indent=2, sort_keys=True)
    (root / MANIFEST).write_text(text + "\n")
