"""`mlxclip finetune | report | wise-ft | eval | demo`: training runs, their reports and evaluation."""

from __future__ import annotations

import sys

import click

from mlx_clip.api import IMAGE_BATCH
from mlx_clip.cli.common import (backend_option, device_option, domain_errors, dtype_option,
                                 max_num_patches_option, pickle_option, quantize_option)


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


@click.command()
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


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder for the report [default: RUN_DIR/report].")
@domain_errors
def report_command(run_dir, out):
    """A fine-tuning run as PNG curves (loss, lr, logit scale, throughput, memory, evaluations) and a Markdown summary."""
    from mlx_clip.training.run_report import write_run_report

    written = write_run_report(run_dir, out)
    click.echo(f"wrote {written.markdown} and {', '.join(p.name for p in written.figures)}")


@click.command("wise-ft")
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


@click.command("eval")
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
@quantize_option()
@max_num_patches_option
@domain_errors
def eval_command(model, compare_models, data, control, templates, classes, tasks, image_column, caption_column,
                 split, image_size, out, batch_size, backend, device, dtype, allow_pickle, quantize, max_num_patches):
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
                  image_column=image_column, caption_column=caption_column, image_size=image_size, split=split,
                  quantize=quantize, max_num_patches=max_num_patches)
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


@click.group()
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
