"""`mlxclip serve | index`: the HTTP API and the search index it serves."""

from __future__ import annotations

import os
import sys

import click

from mlx_clip.api import IMAGE_BATCH
from mlx_clip.cli.common import (backend_option, device_option, domain_errors, dtype_option,
                                 max_num_patches_option, model_option, pickle_option, quantize_option)


@click.command()
@model_option
@backend_option
@device_option
@dtype_option
@pickle_option
@quantize_option()
@max_num_patches_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback unless told).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="An index folder from `mlxclip index`, served by /v1/search.")
@click.option("--max-batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Rows per engine call when requests are micro-batched (1: no batching).")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How long a batch waits for more requests before it runs.")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=16.0, show_default=True)
@click.option("--max-items", type=click.IntRange(1), default=64, show_default=True,
              help="Images or texts per request.")
@click.option("--max-labels", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--max-prompts", type=click.IntRange(1), default=4096, show_default=True,
              help="Labels x templates in one /v1/classify: each is a text embedded before the image is classified.")
@click.option("--max-text-chars", type=click.IntRange(1), default=4096, show_default=True,
              help="Characters per text, label or template (413 past it, before any is tokenized).")
@click.option("--max-concurrent-requests", type=click.IntRange(1), default=64, show_default=True,
              help="Requests in flight; more are answered 429 at once.")
@click.option("--max-image-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Width x height above which an image is refused from its header (413).")
@click.option("--no-truncate", is_flag=True, help="Refuse texts over the context (422) instead of cutting them.")
@click.option("--api-key", envvar="MLXCLIP_API_KEY", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--no-ui", is_flag=True, help="Serve the API only, without the web page at /.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
@domain_errors
def serve(model, backend, device, dtype, allow_pickle, quantize, max_num_patches, host, port, index_dir,
          max_batch_size, max_wait_ms, max_body_mb, max_items, max_labels, max_prompts, max_text_chars,
          max_concurrent_requests, max_image_pixels, no_truncate, api_key, no_ui, log_level):
    """HTTP API: embeddings (also OpenAI's /v1/embeddings), zero-shot classify, search; docs at /docs,
    a web page to search and classify at /. Ctrl-C or SIGTERM shuts it down cleanly (exit 0)."""
    from pathlib import Path

    from mlx_clip.serve.limits import Limits
    from mlx_clip.serve.server import serve as run
    from mlx_clip.serve.service import ServeSettings

    limits = Limits(max_body_bytes=int(max_body_mb * 2 ** 20), max_items=max_items, max_labels=max_labels,
                    max_prompts=max_prompts, max_text_chars=max_text_chars, max_image_pixels=max_image_pixels,
                    max_concurrent_requests=max_concurrent_requests, truncate=not no_truncate)
    settings = ServeSettings(model=model, backend=backend, device=device, dtype=dtype, allow_pickle=allow_pickle,
                             quantize=quantize, max_num_patches=max_num_patches,
                             index=Path(index_dir) if index_dir else None,
                             max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, limits=limits,
                             api_key=api_key or None, ui=not no_ui)
    run(settings, host=host, port=port, log_level=log_level)
    # The server has shut down cleanly. End the process here rather than through the interpreter's
    # teardown: the engine's native worker threads (MLX's streams) were sometimes destroyed while
    # still joinable there, and C++ aborted the process (exit -6 after "Finished server process").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@click.command()
@click.argument("image_dir", type=click.Path(file_okay=False))
@model_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder (created or updated).")
@backend_option
@device_option
@dtype_option
@pickle_option
@quantize_option()
@max_num_patches_option
@click.option("--batch-size", type=click.IntRange(1), default=IMAGE_BATCH, show_default=True)
@domain_errors
def index(image_dir, model, out, backend, device, dtype, allow_pickle, quantize, max_num_patches, batch_size):
    """Embed every image under IMAGE_DIR for `serve --index`; a rerun embeds only new or changed files.
    Images the server would refuse (not JPEG, PNG or WebP by their bytes, or unreadable) are
    skipped and listed. Ctrl-C keeps what was embedded (exit 130)."""
    from mlx_clip.index import IndexInterrupted, build_index

    try:
        report = build_index(image_dir, model, out, backend=backend, device=device, dtype=dtype,
                             allow_pickle=allow_pickle, batch_size=batch_size, quantize=quantize,
                             max_num_patches=max_num_patches)
    except IndexInterrupted as stop:  # what was embedded is written: say how much
        click.echo(f"error: interrupted; kept {stop.kept} of {stop.total} images in {stop.out}; run the same command "
                   "again to embed the rest", err=True)
        sys.exit(130)
    click.echo(f"wrote {report.out}: {report.images} images ({report.embedded} embedded, {report.reused} "
               f"unchanged, {report.removed} removed), {len(report.bad)} skipped")
    if report.bad:
        click.echo(f"skipped images (unreadable, or a format the server refuses) are listed with the reason in "
                   f"{report.out / 'bad_images.txt'}", err=True)
