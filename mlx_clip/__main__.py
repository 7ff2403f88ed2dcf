"""`python -m mlx_clip …` is the `mlxclip` command."""

from mlx_clip.cli import main

main()
