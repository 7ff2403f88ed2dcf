"""`mlxclip …`: thin click commands over typed functions. Domain errors become one line, exit 2."""

from __future__ import annotations

import functools
import os
import sys

import click

from mlx_clip.api import IMAGE_BATCH
from mlx_clip.errors import MlxClipError
from mlx_clip.engine.policy import DTYPES


def domain_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
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
pickle_option = click.option("--allow-pickle", is_flag=True,
                             help="Allow pytorch_model.bin (read with weights_only=True; never executes code).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxclip")
def main():
    """Fine-tune CLIP on your own image-text domain, in MLX or PyTorch."""


@main.command()
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
@domain_errors
def embed(model, images, texts, out, backend, device, dtype, allow_pickle, image_size):
    """Write L2-normalised image_embeds / text_embeds (float32, one row per input, in order)."""
    from mlx_clip.embed import embed as run

    arrays = run(model, images=images, texts=texts, out=out, backend=backend, device=device, dtype=dtype,
                 allow_pickle=allow_pickle, image_size=image_size)
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
    from mlx_clip.conversion import convert as run
    from mlx_clip.api import resolve

    out = run(resolve(src, allow_pickle=allow_pickle), dst, to=target, dtype=dtype, allow_pickle=allow_pickle,
              verify=not no_verify, overwrite=overwrite)
    click.echo(f"wrote {out}")


@main.command()
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
@domain_errors
def shard(data, out_dir, samples_per_shard, overwrite, split, image_column, caption_column, templates):
    """Write DATA (captions file, class folders, train/ + val/ folders, parquet) as webdataset tar
    shards with a manifest in OUT_DIR, to train from the streaming path. Unreadable images are
    skipped and listed."""
    from mlx_clip.data.shard_writer import write_shards

    write_shards(data, out_dir, samples_per_shard=samples_per_shard, overwrite=overwrite, split=split,
                 image_column=image_column, caption_column=caption_column, templates=templates, echo=click.echo)


@main.command()
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-measure", is_flag=True, help="Skip the matmul measurement (a second or two).")
def env(as_json, no_measure):
    """Machine, engines, versions and the BLAS MLX uses with its GFLOP/s: paste it into a bug report."""
    import json

    from mlx_clip.environment import format_report, report

    data = report(measure=not no_measure)
    click.echo(json.dumps(data, indent=2) if as_json else format_report(data))


@main.command()
@click.option("--size", type=click.Choice(["tiny", "b32"]), default="tiny", show_default=True,
              help="tiny: seconds, for CI; b32: OpenAI's ViT-B/32 at 224 px, batch 32 (minutes).")
@click.option("--out", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Folder for results.json, results.md and results.png.")
@click.option("--steps", type=int, default=None, help="Timed train steps per row (after warm-up).")
@click.option("--serving", is_flag=True,
              help="Instead: load-test `mlxclip serve` (concurrent clients, micro-batched vs not).")
@domain_errors
def bench(size, out, steps, serving):
    """Both engines side by side: train images/s, MFU, inference, data pipeline, memory, peers."""
    if serving:
        from mlx_clip.benchmarks.serving import run as run_serving

        run_serving(size, out, echo=click.echo)
        return
    from mlx_clip.benchmarks.suite import run

    run(size, out, steps=steps, echo=click.echo)


model_option = click.option("--model", required=True,
                            help="Model folder, built-in name (tiny, small, vit-b32) or hub id org/name.")


@main.command()
@model_option
@backend_option
@device_option
@dtype_option
@pickle_option
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
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
@domain_errors
def serve(model, backend, device, dtype, allow_pickle, host, port, index_dir, max_batch_size, max_wait_ms,
          max_body_mb, max_items, max_labels, max_prompts, max_text_chars, max_concurrent_requests, max_image_pixels,
          no_truncate, api_key, log_level):
    """HTTP API: embeddings (also OpenAI's /v1/embeddings), zero-shot classify, search; docs at /docs.
    Ctrl-C or SIGTERM shuts it down cleanly (exit 0)."""
    from pathlib import Path

    from mlx_clip.serve.limits import Limits
    from mlx_clip.serve.server import serve as run
    from mlx_clip.serve.service import ServeSettings

    limits = Limits(max_body_bytes=int(max_body_mb * 2 ** 20), max_items=max_items, max_labels=max_labels,
                    max_prompts=max_prompts, max_text_chars=max_text_chars, max_image_pixels=max_image_pixels,
                    max_concurrent_requests=max_concurrent_requests, truncate=not no_truncate)
    settings = ServeSettings(model=model, backend=backend, device=device, dtype=dtype, allow_pickle=allow_pickle,
                             index=Path(index_dir) if index_dir else None, max_batch_size=max_batch_size,
                             max_wait_ms=max_wait_ms, limits=limits, api_key=api_key or None)
    run(settings, host=host, port=port, log_level=log_level)
    # The server has shut down cleanly. End the process here rather than through the interpreter's
    # teardown: the engine's native worker threads (MLX's streams) were sometimes destroyed while
    # still joinable there, and C++ aborted the process (exit -6 after "Finished server process").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@click.argument("image_dir", type=click.Path(file_okay=False))
@model_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder (created or updated).")
@backend_option
@device_option
@dtype_option
@pickle_option
@click.option("--batch-size", type=click.IntRange(1), default=IMAGE_BATCH, show_default=True)
@domain_errors
def index(image_dir, model, out, backend, device, dtype, allow_pickle, batch_size):
    """Embed every image under IMAGE_DIR for `serve --index`; a rerun embeds only new or changed files.
    Images the server would refuse (not JPEG, PNG or WebP by their bytes, or unreadable) are
    skipped and listed. Ctrl-C keeps what was embedded (exit 130)."""
    from mlx_clip.index import IndexInterrupted, build_index

    try:
        report = build_index(image_dir, model, out, backend=backend, device=device, dtype=dtype,
                             allow_pickle=allow_pickle, batch_size=batch_size)
    except IndexInterrupted as stop:  # what was embedded is written: say how much
        click.echo(f"error: interrupted; kept {stop.kept} of {stop.total} images in {stop.out}; run the same command "
                   "again to embed the rest", err=True)
        sys.exit(130)
    click.echo(f"wrote {report.out}: {report.images} images ({report.embedded} embedded, {report.reused} "
               f"unchanged, {report.removed} removed), {len(report.bad)} skipped")
    if report.bad:
        click.echo(f"skipped images (unreadable, or a format the server refuses) are listed with the reason in "
                   f"{report.out / 'bad_images.txt'}", err=True)


@main.command(hidden=True)
@click.pass_context
def info(ctx):
    """The older name of `mlxclip env` (engines, devices, BLAS): kept so scripts that call it work."""
    ctx.invoke(env, as_json=False, no_measure=False)


def train_config_options(fn):
    """One click option per TrainConfig field; default None so only given flags override."""
    import dataclasses

    from mlx_clip.training.options import TrainConfig

    types = TrainConfig.field_types()
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [default: {f.default}]"
        kind, _ = types[f.name]
        if kind is bool:
            fn = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)(fn)
        else:
            fn = click.option(flag, f.name, type=kind, default=None, help=help_text)(fn)
    return fn


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML/YAML file of options (flags override it).")
@train_config_options
@domain_errors
def finetune(config_file, **flags):
    """Fine-tune a CLIP on your domain with either engine.

    Without --data (in flags or --config) this runs the built-in demo: the 'small' random CLIP on
    rendered shapes, with the demo preset (lr 2e-3, 1000 steps of 48, warmup 40, weight decay
    0.05, out runs/demo; for --model siglip-tiny lr 1e-3, 2000 steps, warmup 200) in place of the
    defaults shown below; any of them can still be given.
    """
    from mlx_clip.finetune import demo_preset, finetune as run
    from mlx_clip.training.options import TrainConfig, read_config_file

    given = {k: v for k, v in flags.items() if v is not None}
    file_values = read_config_file(config_file) if config_file else {}
    demo = given.get("data", file_values.get("data")) is None
    preset = demo_preset(given.get("model", file_values.get("model"))) if demo else {}
    cfg = TrainConfig.resolve(config_file, given, preset=preset)
    run(cfg, echo=click.echo, progress="bar" if sys.stderr.isatty() else "lines")


@main.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder for the report [default: RUN_DIR/report].")
@domain_errors
def report_command(run_dir, out):
    """A fine-tuning run as PNG curves (loss, lr, logit scale, throughput, memory, evaluations) and a Markdown summary."""
    from mlx_clip.training.run_report import write_run_report

    written = write_run_report(run_dir, out)
    click.echo(f"wrote {written.markdown} and {', '.join(p.name for p in written.figures)}")


@main.command("wise-ft")
@click.option("--zero-shot", "zero_shot", required=True, help="The model before fine-tuning.")
@click.option("--fine-tuned", "fine_tuned", required=True, help="The fine-tuned model.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the fine-tuned model: (1-alpha)*zero_shot + alpha*fine_tuned.")
@click.option("--sweep", default=None, help="Evaluate a range of alphas instead, e.g. 0:1:0.1.")
@click.option("--eval-target", "eval_target", multiple=True, help="Target-domain data for --sweep.")
@click.option("--eval-control", "eval_control", multiple=True, help="Control-domain class folders for --sweep.")
@click.option("--control-floor", type=float, default=None, help="Lowest acceptable control accuracy (0-1).")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--out", required=True, type=click.Path(),
              help="Output model folder, or (with --sweep) folder for the curve JSON/PNG.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out model folder (never an input).")
@backend_option
@device_option
@dtype_option
@pickle_option
@domain_errors
def wise_ft(zero_shot, fine_tuned, alpha, sweep, eval_target, eval_control, control_floor, templates, out, overwrite,
            backend, device, dtype, allow_pickle):
    """Interpolate weights against domain shift (WiSE-FT, Wortsman et al. 2022)."""
    from pathlib import Path

    from mlx_clip.robust import wise_ft as wf
    from mlx_clip.api import resolve
    from mlx_clip.errors import ConfigError
    from mlx_clip.outputs import check_folder, refuse_overlap

    models = [resolve(m, allow_pickle=allow_pickle) for m in (zero_shot, fine_tuned)]
    if sweep is None:
        click.echo(f"wrote {wf.wise_ft(*models, alpha, out, overwrite=overwrite, allow_pickle=allow_pickle)}")
        return
    # The curve's files may go beside the models, never into them.
    refuse_overlap(out, {"an input checkpoint (--zero-shot)": models[0],
                         "an input checkpoint (--fine-tuned)": models[1]}, relations=("is", "is inside"))
    check_folder(out)
    if not eval_target or not eval_control:
        missing = " and ".join(o for o, given in (("--eval-target", eval_target), ("--eval-control", eval_control))
                               if not given)
        raise ConfigError(f"--sweep needs {missing}: each alpha is scored on the target domain (what was fine-tuned "
                          "on) and on a control domain (class folders not fine-tuned on), whose loss is the forgetting")
    report = wf.wise_ft_sweep(*models, wf.parse_sweep(sweep), list(eval_target),
                              list(eval_control), backend=backend, out_json=Path(out) / "wise_ft.json",
                              control_floor=control_floor, templates=templates, device=device, dtype=dtype,
                              allow_pickle=allow_pickle)
    click.echo(report.message)


@main.command("eval")
@click.option("--model", default=None, help="Model folder, built-in name or hub id.")
@click.option("--compare", "compare_models", nargs=2, default=None, metavar="BASE FINETUNED",
              help="Evaluate two models and tabulate the difference.")
@click.option("--data", multiple=True, required=True,
              help="Class folders (zero-shot, linear probe) or captions file (retrieval), tar shards, parquet or "
                   "hf:org/name; repeatable.")
@click.option("--control", multiple=True, type=click.Path(exists=True),
              help="A domain not fine-tuned on, to measure forgetting; repeatable.")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--classes", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tasks", default=None, help="Comma list: zero_shot, retrieval, linear_probe.")
@click.option("--image-column", default=None, help="Captions file: column (or JSONL key) of the image paths.")
@click.option("--caption-column", default=None, help="Captions file: column (or JSONL key) of the captions.")
@click.option("--split", default=None, help="hf:org/name or a parquet folder: the split to evaluate (default: train).")
@click.option("--image-size", type=click.IntRange(1), default=None,
              help="Run the model at this many pixels (position embeddings resampled).")
@click.option("--out", required=True, type=click.Path(), help="report.json, or a folder for the reports.")
@click.option("--batch-size", default=IMAGE_BATCH, show_default=True, help="Images per engine call.")
@backend_option
@device_option
@dtype_option
@pickle_option
@domain_errors
def eval_command(model, compare_models, data, control, templates, classes, tasks, image_column, caption_column,
                 split, image_size, out, batch_size, backend, device, dtype, allow_pickle):
    """Zero-shot top-k, retrieval recall@K, linear probe; JSON (CLIP_benchmark's shape), Markdown, PNG."""
    from mlx_clip.evaluation import evaluate as ev
    from mlx_clip.api import resolve
    from mlx_clip.errors import ConfigError
    from mlx_clip.outputs import check_file, check_folder, refuse_overlap

    # Before any model is loaded or image embedded: reports never land in the data they measure.
    refuse_overlap(out, [*(("--data", d) for d in data), *(("--control", c) for c in control)],
                   relations=("is", "is inside"))
    check_file(out) if str(out).endswith(".json") else check_folder(out)
    common = dict(control=list(control) or None, backend=backend, templates=templates, classes=classes,
                  tasks=tasks, batch_size=batch_size, device=device, dtype=dtype, allow_pickle=allow_pickle,
                  image_column=image_column, caption_column=caption_column, image_size=image_size, split=split)
    if compare_models:
        base, finetuned = (resolve(m, allow_pickle=allow_pickle) for m in compare_models)
        click.echo(ev.compare(base, finetuned, list(data), out=out, **common).markdown.read_text())
        return
    if model is None:
        raise ConfigError("give --model, or --compare BASE FINETUNED")
    for result in ev.evaluate(resolve(model, allow_pickle=allow_pickle), list(data), out=out, **common):
        # None: a top-k or recall@K every guess would reach (k >= candidates), written null in the JSON.
        shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in result["metrics"].items()
                          if v is None or isinstance(v, float))
        click.echo(f"{result.get('role', 'target')} {result['dataset']} {result['task']}: {shown}")


@main.group()
def demo():
    """Built-in cases that run end to end on rendered data (no download)."""


@demo.command("domain-shift")
@click.option("--preset", type=click.Choice(["default", "ci"]), default="default", show_default=True,
              help="default: the README's case (about 5 minutes on 2 cores); ci: fewer images and steps (~75 s).")
@click.option("--out", default="runs/domain-shift", show_default=True, type=click.Path(file_okay=False),
              help="Run folder: each stage's runs and domain_shift.{json,md,png}.")
@backend_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pictures and of every run.")
@domain_errors
def domain_shift(preset, out, backend, seed):
    """Forgetting, shown: train a base on domain A, fine-tune it on domain B (plain, LP-FT, L2-SP),
    sweep WiSE-FT, and report target (B) and control (A) accuracy of each."""
    from mlx_clip.robust.domain_shift import run_domain_shift

    result = run_domain_shift(out, preset=preset, backend=backend, seed=seed, echo=click.echo,
                              progress="bar" if sys.stderr.isatty() else "lines")
    click.echo(f"report: {result.files['markdown']}")
