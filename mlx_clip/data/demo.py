"""The built-in demo: a small synthetic domain rendered by the package itself, no downloads.

Layout under `root`:

```
demo.json                      parameters + content hash; a matching one means "reuse"
target/train/<colour>_<shape>/NNNN.png   the domain to fine-tune on (12 classes)
target/val/<colour>_<shape>/NNNN.png     held out, for zero-shot top-1
target/captions_train.csv      image,caption ("a small red circle in the top left on a grey ...")
target/captions_val.csv        the same for val images, for retrieval recall@K
control/val/<colour>_<pattern>/NNNN.png  a domain never trained on, to measure forgetting
```

Every image draws from its own generator seeded by (seed, domain, split, class, index), so the
bytes depend only on the parameters, never on generation order. Shapes are drawn as a 4x
supersampled mask and box-filtered down, which keeps edges anti-aliased and deterministic.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mlx_clip.errors import ConfigError, DataError

GENERATOR_VERSION = 1  # bump when the pictures change, so old demo folders are regenerated
MANIFEST = "demo.json"
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 215, 40),
}
PATTERNS = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "dots")
CONTROL_COLOURS = {
    "orange": (240, 135, 25),
    "purple": (135, 45, 185),
    "cyan": (35, 200, 210),
    "pink": (245, 125, 185),
}
_SUPERSAMPLE = 4
_DOMAINS = {"target": 0, "control": 1}
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class DemoParams:
    image_size: int
    per_class_train: int
    per_class_val: int
    per_class_control: int
    seed: int
    version: int = GENERATOR_VERSION

    def check(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"demo image_size must be in [16, 1024], got {self.image_size}")
        for name in ("per_class_train", "per_class_val", "per_class_control"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo {name} must be >= 1, got {getattr(self, name)}")


def target_classes() -> list[str]:
    return [f"{colour}_{shape}" for shape in SHAPES for colour in COLOURS]


def control_classes() -> list[str]:
    return [f"{colour}_{pattern}" for pattern in PATTERNS for colour in CONTROL_COLOURS]


def make_demo(
    root: str | Path,
    *,
    image_size: int = 64,
    per_class_train: int = 80,
    per_class_val: int = 20,
    per_class_control: int = 20,
    seed: int = 0,
) -> dict[str, Path]:
    """Render the demo domains under `root` (or reuse a complete one with the same parameters)."""
    root = Path(root).expanduser().resolve()
    params = DemoParams(image_size, per_class_train, per_class_val, per_class_control, seed)
    params.check()
    paths = demo_paths(root)
    manifest = _read_manifest(root)
    if (
        manifest is not None
        and manifest.get("params") == asdict(params)
        and manifest.get("status") == "complete"
    ):
        if manifest.get("sha256") == content_hash(root):
            return paths
    _clear(root, manifest)
    _write_manifest(root, {"status": "building", "params": asdict(params)})
    _render_target(root / "target", params)
    _render_control(root / "control", params)
    files = _demo_files(root)
    _write_manifest(
        root,
        {
            "status": "complete",
            "params": asdict(params),
            "files": len(files),
            "sha256": content_hash(root),
        },
    )
    return paths


def demo_paths(root: Path) -> dict[str, Path]:
    return {
        "root": root,
        "manifest": root / MANIFEST,
        "target": root / "target",
        "target_train": root / "target" / "train",
        "target_val": root / "target" / "val",
        "captions_train": root / "target" / "captions_train.csv",
        "captions_val": root / "target" / "captions_val.csv",
        "control": root / "control",
        "control_val": root / "control" / "val",
    }


# ---------------------------------------------------------------------------------------------
# folder bookkeeping


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(root: Path, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(
        json.dumps({"format": "mlxclip-demo", **data}, indent=2, sort_keys=True) + "\n"
    )


def _clear(root: Path, manifest: dict | None) -> None:
    """Remove an old or partial demo; refuse to touch a folder that never held one."""
    if root.exists() and manifest is None and any(root.iterdir()):
        raise DataError(
            f"{root}: folder is not empty and holds no {MANIFEST}; "
            "give a new or empty folder for the demo"
        )
    for name in ("target", "control"):
        shutil.rmtree(root / name, ignore_errors=True)


def _demo_files(root: Path) -> list[Path]:
    return sorted(
        p for name in ("target", "control") for p in (root / name).rglob("*") if p.is_file()
    )


def content_hash(root: str | Path) -> str:
    """sha256 over every demo file's relative path and bytes, independent of where root is."""
    root = Path(root)
    digest = hashlib.sha256()
    for p in _demo_files(root):
        digest.update(p.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(p.read_bytes()).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the target domain: coloured shapes


def _render_target(folder: Path, p: DemoParams) -> None:
    for split, count in (("train", p.per_class_train), ("val", p.per_class_val)):
        rows = []
        for label, name in enumerate(target_classes()):
            colour, shape = name.split("_")
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([p.seed, _DOMAINS["target"], _SPLITS[split], label, i])
                pixels, caption = shape_image(rng, p.image_size, colour, shape)
                rel = f"{split}/{name}/{i:04d}.png"
                save_png(pixels, folder / rel)
                rows.append((rel, caption))
        with open(folder / f"captions_{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("image", "caption"))
            writer.writerows(rows)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    level = rng.uniform(70, 185)
    tint = rng.uniform(-10, 10, size=3)
    word = "dark grey" if level < 105 else "light grey" if level > 150 else "grey"
    return np.broadcast_to(level + tint, (size, size, 3)).astype(np.float32), word


def _jitter(
    rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 25.0
) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, size=3), 0, 255)


def shape_image(
    rng: np.random.Generator, size: int, colour: str, shape: str
) -> tuple[np.ndarray, str]:
    background, bg_word = _background(rng, size)
    fill = _jitter(rng, COLOURS[colour])
    radius = rng.uniform(0.18, 0.32) * size  # circumradius: every shape fits a circle of this size
    cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    angle = rng.uniform(-15, 15) * np.pi / 180
    alpha = _shape_mask(size, shape, cx, cy, radius, angle)
    pixels = background * (1 - alpha) + fill * alpha + rng.normal(0, 6, size=(size, size, 3))
    size_word = "small" if radius < 0.25 * size else "large"
    caption = (
        f"a {size_word} {colour} {shape} {_where(cx / size, cy / size)} on a {bg_word} background"
    )
    return pixels, caption


def _shape_mask(
    size: int, shape: str, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    k = _SUPERSAMPLE
    mask = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        r = 0.85 * radius * k
        draw.ellipse((cx * k - r, cy * k - r, cx * k + r, cy * k + r), fill=255)
    else:
        corners = 4 if shape == "square" else 3
        # Square corners sit at 45 deg; the triangle points up; both turn by the small angle.
        start = np.pi / 4 if corners == 4 else -np.pi / 2
        theta = start + angle + 2 * np.pi * np.arange(corners) / corners
        xs, ys = (cx + radius * np.cos(theta)) * k, (cy + radius * np.sin(theta)) * k
        draw.polygon([(float(x), float(y)) for x, y in zip(xs, ys, strict=True)], fill=255)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return (np.asarray(small, np.float32) / 255.0)[..., None]  # (H, W, 1)


def _where(x: float, y: float) -> str:
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    if row and col:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the center"


# ---------------------------------------------------------------------------------------------
# the control domain: coloured patterns


def _render_control(folder: Path, p: DemoParams) -> None:
    for label, name in enumerate(control_classes()):
        colour, pattern = name.split("_", 1)
        (folder / "val" / name).mkdir(parents=True, exist_ok=True)
        for i in range(p.per_class_control):
            rng = np.random.default_rng([p.seed, _DOMAINS["control"], _SPLITS["val"], label, i])
            save_png(
                pattern_image(rng, p.image_size, colour, pattern),
                folder / "val" / name / f"{i:04d}.png",
            )


def pattern_image(rng: np.random.Generator, size: int, colour: str, pattern: str) -> np.ndarray:
    background, _ = _background(rng, size)
    fill = _jitter(rng, CONTROL_COLOURS[colour])
    period = rng.uniform(size / 8, size / 5)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if pattern == "dots":
        ox, oy = rng.uniform(0, period, size=2)
        dx = (x - ox) % period - period / 2
        dy = (y - oy) % period - period / 2
        r = rng.uniform(0.25, 0.35) * period
        alpha = np.clip(r - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1)
    else:
        base = {
            "horizontal_stripes": 90.0,
            "vertical_stripes": 0.0,
            "diagonal_stripes": rng.choice([45.0, -45.0]),
        }
        theta = (base[pattern] + rng.uniform(-8, 8)) * np.pi / 180
        t = x * np.cos(theta) + y * np.sin(theta)
        # A steep clipped cosine: half-duty stripes with about one pixel of anti-aliased edge.
        alpha = np.clip(
            0.5 + period / 4 * np.cos(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)), 0, 1
        )
    alpha = alpha[..., None]
    return background * (1 - alpha) + fill * alpha + rng.normal(0, 6, size=(size, size, 3))


def save_png(pixels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    image.save(path, format="PNG", compress_level=1)
