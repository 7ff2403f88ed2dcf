"""What every `mlxclip` command shares: domain errors as one line, and the engine options."""

from __future__ import annotations

import functools
import os
import sys

import click

from mlx_clip.engine.distributed import PeerLost
from mlx_clip.engine.policy import DTYPES
from mlx_clip.model.config import QUANTIZE_BITS, QUANTIZE_GROUP_SIZE
from mlx_clip.errors import MlxClipError


def domain_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PeerLost as err:
            click.echo(f"error: {err}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # The process group is broken, and its destructors may abort at interpreter exit (gloo
            # with a send still pending raised SIGABRT after this line, 1 run in 3): every `finally`
            # on the way here has run, so the process ends now, with the code the line promises.
            os._exit(err.exit_code)
        except MlxClipError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            # Where a command has something to say (what was kept) it raises Interrupted instead;
            # any other Ctrl-C ends with one line and the shell's code for SIGINT, not a traceback.
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except OSError as err:
            # A file or folder the system refused (full disk, permissions, a path under a file):
            # the path and the reason, once; the commands check their outputs before any work.
            where = f"{err.filename}: " if err.filename else ""
            click.echo(f"error: {where}{err.strerror or err}", err=True)
            sys.exit(2)

    return wrapper


backend_option = click.option("--backend", type=click.Choice(["mlx", "torch"]), default="mlx", show_default=True,
                              help="Engine: MLX (native) or PyTorch (MPS > CUDA > CPU).")
device_option = click.option("--device", default=None,
                             help="Override device detection: torch cpu|cuda|cuda:N|mps, mlx cpu|gpu.")
dtype_option = click.option("--dtype", type=click.Choice(DTYPES), default=None,
                            help="Compute dtype (default: float32).")
QUANTIZE_HELP = ("MLX engine: run the transformer and projection Linears with "
                 f"{'- or '.join(map(str, QUANTIZE_BITS))}-bit weights (MLX's affine quantization, group size "
                 f"{QUANTIZE_GROUP_SIZE}: a scale and a bias per "
                 f"{QUANTIZE_GROUP_SIZE} weights); embeddings, norms and the patch conv stay float32. Saves weight "
                 "memory; on a GPU it runs MLX's quantized kernels, on the CPU it dequantizes each layer as it "
                 "runs and is slower than float32.")


def quantize_option(help_text: str = QUANTIZE_HELP):
    """--quantize 8|4 as an int (None when not given)."""
    return click.option("--quantize", type=click.Choice([str(b) for b in QUANTIZE_BITS]), default=None,
                        callback=lambda ctx, param, value: None if value is None else int(value), help=help_text)


# Shared by the commands that embed images with a loaded model (embed, eval, serve, index); a budget
# given for a square model is refused by `api.load` (`policy.check_patch_budget`) in one line.
max_num_patches_option = click.option(
    "--max-num-patches", type=click.IntRange(1), default=None,
    help="NaFlex SigLIP 2 only: at most this many patches per image, each image keeping its aspect ratio "
         "(default: the model folder's preprocessor)")

pickle_option = click.option("--allow-pickle", is_flag=True,
                             help="Allow pytorch_model.bin (read with weights_only=True; never executes code).")

model_option = click.option("--model", required=True,
                            help="Model folder, built-in name (tiny, small, vit-b32) or hub id org/name.")
