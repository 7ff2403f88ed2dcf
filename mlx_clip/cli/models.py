"""`mlxclip embed | convert | shard | export | env | bench`: models, data and the machine."""

from __future__ import annotations


import click

from mlx_clip.cli.common import (backend_option, device_option, domain_errors, dtype_option,
                                 max_num_patches_option, pickle_option, quantize_option)
from mlx_clip.model.config import QUANTIZE_BITS, QUANTIZE_GROUP_SIZE


@click.command()
@click.option("--model", required=True, help="Model folder, built-in name (tiny, small, vit-b32) or hub id org/name.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False), help="Image file (repeatable).")
@click.option("--text", "texts", multiple=True, help="Text (repeatable).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz.")
@backend_option
@device_option
@dtype_option
@pickle_option
@click.option("--image-size", type=click.IntRange(1), default=None,
              help="Run the model at this many pixels (position embeddings resampled).")
@quantize_option()
@max_num_patches_option
@domain_errors
def embed(model, images, texts, out, backend, device, dtype, allow_pickle, image_size, quantize, max_num_patches):
    """Write L2-normalised image_embeds / text_embeds (float32, one row per input, in order)."""
    from mlx_clip.embed import embed as run

    arrays = run(model, images=images, texts=texts, out=out, backend=backend, device=device, dtype=dtype,
                 allow_pickle=allow_pickle, image_size=image_size, quantize=quantize, max_num_patches=max_num_patches)
    click.echo(f"wrote {out}: image_embeds {arrays['image_embeds'].shape}, text_embeds {arrays['text_embeds'].shape}")


@click.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--to", "target", type=click.Choice(["mlx", "hf", "open_clip"]), required=True)
@dtype_option
@pickle_option
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DST.")
@click.option("--no-verify", is_flag=True, help="Skip embedding a random batch with source and result.")
@quantize_option("With --to mlx: write the transformer and projection Linears "
                 f"{'- or '.join(map(str, QUANTIZE_BITS))}-bit (MLX's affine quantization, group size "
                 f"{QUANTIZE_GROUP_SIZE}), as mlx-lm stores them: weight, "
                 "scales and biases per layer and a 'quantization' entry in config.json. The folder loads "
                 "quantized in the MLX engine without --quantize; training and the torch engine refuse it.")
@domain_errors
def convert(src, dst, target, dtype, allow_pickle, overwrite, no_verify, quantize):
    """Convert a CLIP checkpoint (format detected) to MLX, Hugging Face or open_clip safetensors."""
    from mlx_clip.conversion import convert as run
    from mlx_clip.api import resolve

    out = run(resolve(src, allow_pickle=allow_pickle), dst, to=target, dtype=dtype, allow_pickle=allow_pickle,
              verify=not no_verify, overwrite=overwrite, quantize=quantize)
    click.echo(f"wrote {out}")


@click.command()
@click.argument("data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--samples-per-shard", type=int, default=10_000, show_default=True, help="Samples in each .tar shard.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR (never one that overlaps DATA).")
@click.option("--split", default=None,
              help="A folder with train/ and val/: which to write [default: train]; a Hugging Face dataset: its split.")
@click.option("--image-column", default=None, help="Captions file or parquet: column (or JSONL key) of the images.")
@click.option("--caption-column", default=None, help="Captions file or parquet: column (or JSONL key) of the captions.")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Class folders: prompt templates, one per line, that caption each image.")
@click.option("--negative-column", default=None,
              help="Hard-negative captions to carry (columns or keys, comma-separated), written to each sample's "
                   "json as \"negatives\"; train on them with finetune --negative-column negatives.")
@domain_errors
def shard(data, out_dir, samples_per_shard, overwrite, split, image_column, caption_column, templates,
          negative_column):
    """Write DATA (captions file, class folders, train/ + val/ folders, parquet) as webdataset tar
    shards with a manifest in OUT_DIR, to train from the streaming path. Unreadable images are
    skipped and listed."""
    from mlx_clip.data.shard_writer import write_shards

    write_shards(data, out_dir, samples_per_shard=samples_per_shard, overwrite=overwrite, split=split,
                 image_column=image_column, caption_column=caption_column, templates=templates,
                 negative_column=negative_column, echo=click.echo)


@click.command()
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--to", "target", type=click.Choice(["onnx"]), required=True)
@click.option("--opset", type=int, default=None,
              help="ONNX opset [default: the oldest torch's exporter writes, which most runtimes load].")
@pickle_option
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@domain_errors
def export(model, out_dir, target, opset, allow_pickle, overwrite):
    """Write the image and text encoders as ONNX graphs (dynamic batch), with tokenizer and
    preprocessing files; kept only if onnxruntime matches the torch engine on a random batch."""
    from mlx_clip.export import export_onnx

    given = {} if opset is None else {"opset": opset}
    click.echo(f"wrote {export_onnx(model, out_dir, overwrite=overwrite, allow_pickle=allow_pickle, **given)}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-measure", is_flag=True, help="Skip the matmul measurement (a second or two).")
def env(as_json, no_measure):
    """Machine, engines, versions and the BLAS MLX uses with its GFLOP/s: paste it into a bug report."""
    import json

    from mlx_clip.environment import format_report, report

    data = report(measure=not no_measure)
    click.echo(json.dumps(data, indent=2) if as_json else format_report(data))


@click.command()
@click.option("--size", type=click.Choice(["tiny", "b32"]), default="tiny", show_default=True,
              help="tiny: seconds, for CI; b32: OpenAI's ViT-B/32 at 224 px, batch 32 (minutes).")
@click.option("--out", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Folder for results.json, results.md and results.png.")
@click.option("--steps", type=int, default=None, help="Timed train steps per row (after warm-up).")
@click.option("--serving", is_flag=True,
              help="Instead: load-test `mlxclip serve` (concurrent clients, micro-batched vs not).")
@click.option("--data", "data_sizes", default=None, metavar="N,N,...",
              help="Instead: data loading at these sample counts (e.g. 10000,100000,1000000): time to the first "
                   "batch, peak RSS and images/s of captions files, parquet and webdataset shards, beside open_clip's "
                   "webdataset pipeline; into OUT/data.")
@domain_errors
def bench(size, out, steps, serving, data_sizes):
    """Both engines side by side: train images/s, MFU, inference, data pipeline, memory, peers."""
    if data_sizes:
        import tempfile
        from pathlib import Path

        from mlx_clip.benchmarks.data import BATCH_SIZE, run as run_data
        from mlx_clip.errors import ConfigError

        try:
            sizes = [int(n.replace("_", "")) for n in data_sizes.split(",") if n.strip()]
        except ValueError:
            raise ConfigError(f"--data {data_sizes}: expected sample counts separated by commas") from None
        if not sizes or min(sizes) < BATCH_SIZE:
            raise ConfigError(f"--data {data_sizes}: every count must be at least the batch size ({BATCH_SIZE})")
        run_data(sizes, Path(tempfile.gettempdir()) / "mlxclip-databench", Path(out) / "data", echo=click.echo)
        return
    if serving:
        from mlx_clip.benchmarks.serving import run as run_serving

        run_serving(size, out, echo=click.echo)
        return
    from mlx_clip.benchmarks.suite import run

    run(size, out, steps=steps, echo=click.echo)


@click.command(hidden=True)
@click.pass_context
def info(ctx):
    """The older name of `mlxclip env` (engines, devices, BLAS): kept so scripts that call it work."""
    ctx.invoke(env, as_json=False, no_measure=False)
