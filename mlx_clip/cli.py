"""`mlxclip …`: thin click commands over typed functions. Domain errors become one line, exit 2."""

from __future__ import annotations

import functools
import sys

import click

from mlx_clip.errors import MlxClipError


def domain_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MlxClipError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)

    return wrapper


backend_option = click.option("--backend", type=click.Choice(["mlx", "torch"]), default="mlx", show_default=True,
                              help="Engine: MLX (native) or PyTorch (MPS > CUDA > CPU).")
device_option = click.option("--device", default=None,
                             help="Override device detection: torch cpu|cuda|cuda:N|mps, mlx cpu|gpu.")
dtype_option = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                            help="Compute dtype (default: float32).")
pickle_option = click.option("--allow-pickle", is_flag=True,
                             help="Allow pytorch_model.bin (read with weights_only=True; never executes code).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxclip")
def main():
    """Fine-tune CLIP on your own image-text domain, in MLX or PyTorch."""


@main.command()
@click.option("--model", required=True, help="Model folder, built-in name (tiny, vit-b32) or hub id org/name.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False), help="Image file (repeatable).")
@click.option("--text", "texts", multiple=True, help="Text (repeatable).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz.")
@backend_option
@device_option
@dtype_option
@pickle_option
@domain_errors
def embed(model, images, texts, out, backend, device, dtype, allow_pickle):
    """Write L2-normalised image_embeds / text_embeds (float32, one row per input, in order)."""
    from mlx_clip.embed import embed as run

    arrays = run(model, images=images, texts=texts, out=out, backend=backend, device=device, dtype=dtype,
                 allow_pickle=allow_pickle)
    click.echo(f"wrote {out}: image_embeds {arrays['image_embeds'].shape}, text_embeds {arrays['text_embeds'].shape}")


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--to", "target", type=click.Choice(["mlx", "hf", "open_clip"]), required=True)
@dtype_option
@pickle_option
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DST.")
@click.option("--no-verify", is_flag=True, help="Skip embedding a random batch with source and result.")
@domain_errors
def convert(src, dst, target, dtype, allow_pickle, overwrite, no_verify):
    """Convert a CLIP checkpoint (format detected) to MLX, Hugging Face or open_clip safetensors."""
    from convert import convert as run
    from mlx_clip.api import resolve

    out = run(resolve(src, allow_pickle=allow_pickle), dst, to=target, dtype=dtype, allow_pickle=allow_pickle,
              verify=not no_verify, overwrite=overwrite)
    click.echo(f"wrote {out}")


@main.command()
def info():
    """Show the engines, devices and BLAS this machine gives mlxclip."""
    from mlx_clip.blas import blas_info

    choice = blas_info()
    click.echo(f"BLAS for MLX: {choice.name}" + (f" ({choice.path})" if choice.path else ""))
    try:
        import mlx.core as mx

        click.echo(f"mlx {mx.__version__}: default device {mx.default_device()}")
    except ImportError:
        click.echo("mlx: not installed")
    try:
        import torch

        from torch_backend.model import select_device

        click.echo(f"torch {torch.__version__}: auto device {select_device(None)}")
    except ImportError:
        click.echo("torch: not installed")
