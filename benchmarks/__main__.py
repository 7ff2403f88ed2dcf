"""`python -m benchmarks [--size tiny|b32] [--out DIR] [--steps N]`: the same as `mlxclip bench`."""

import mlx_clip  # noqa: F401  (the BLAS loader runs before anything imports mlx)

import argparse

from mlx_clip.benchmarks.suite import PRESETS, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(PRESETS), default="tiny")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    run(args.size, args.out, steps=args.steps)


if __name__ == "__main__":
    main()
