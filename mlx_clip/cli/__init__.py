"""`mlxclip …`: thin click commands over typed functions. Domain errors become one line, exit 2.

The commands live by subject: `models` (embed, convert, shard, export, env, bench), `serving`
(serve, index), `training` (finetune, report, wise-ft, eval, demo); `common` holds what they share.
"""

from __future__ import annotations

import click

from mlx_clip.cli import models, serving, training
from mlx_clip.cli.common import domain_errors

__all__ = ["domain_errors", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxclip")
def main():
    """Fine-tune CLIP on your own image-text domain, in MLX or PyTorch."""


for command in (models.embed, models.convert, models.shard, models.export, models.env, models.bench, models.info,
                serving.serve, serving.index, training.finetune, training.report_command, training.wise_ft,
                training.eval_command, training.demo):
    main.add_command(command)
