"""Prompt templates that turn a class name into a caption, as CLIP's zero-shot classifier does.

The defaults are a subset of the 80 ImageNet prompts published with CLIP (Radford et al. 2021,
`notebooks/Prompt_Engineering_for_ImageNet.ipynb`; open_clip's `OPENAI_IMAGENET_TEMPLATES`). Prompts
that name a colour, a size or a darkness ("a black and white photo of", "a photo of a small") are
left out: they would contradict the class words of colour/shape domains such as the built-in demo.
"""

from __future__ import annotations

from mlx_clip.errors import DataError

PLACEHOLDER = "{}"

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a rendering of a {}.",
    "a drawing of a {}.",
    "art of a {}.",
)


def check_template(template: str, where: str = "template") -> str:
    """Return `template` if it has exactly one `{}` for the class name, else raise DataError."""
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"{where} {template!r} is empty; a template is text with one '{{}}'")
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise DataError(
            f"{where} {template!r} has {count} '{{}}' placeholders; it needs exactly one, "
            "where the class name goes (e.g. 'a photo of a {}.')"
        )
    return template


def prompt_name(class_name: str) -> str:
    """The words a class folder name stands for: `red_circle` -> `red circle`."""
    return " ".join(class_name.replace("_", " ").split())


def fill(template: str, name: str) -> str:
    """Put the class name into the template's `{}`; other braces are left as they are."""
    check_template(template)
    words = prompt_name(name) if isinstance(name, str) else ""
    if not words:
        raise DataError(f"class name {name!r} is empty; a class needs a name to fill {template!r}")
    return template.replace(PLACEHOLDER, words)


def check_templates(templates: list[str] | tuple[str, ...], where: str = "templates") -> list[str]:
    """Validate a whole template list (non-empty, each with one `{}`), returned as a list."""
    if isinstance(templates, str):
        raise DataError(f"{where} must be a list of strings, got the single string {templates!r}")
    out = [check_template(t, f"{where}[{i}]") for i, t in enumerate(templates)]
    if not out:
        raise DataError(
            f"{where} is empty; give at least one template such as 'a photo of a {{}}.'"
        )
    return out
