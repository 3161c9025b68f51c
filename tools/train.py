"""Train a recipe: `python tools/train.py --recipe 2to8 [key=value ...]`.

Several ranks: `torchrun --nproc_per_node N tools/train.py ...` or `deepspeed tools/train.py ...`
(multi-node: see the README). The accelerator is CUDA when torch sees a GPU, else the CPU (DS_ACCELERATOR overrides).
"""

import argparse
import sys

from janusflow.config import ConfigError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="2to8", help="recipe name (recipes/NAME.yaml) or a YAML path")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue the run in run_dir if any; none: start fresh; weights: continue on "
                             "another number of ranks (weights, EMA, data position; fresh optimizer state)")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="stop (with a checkpoint) after this many optimizer steps; continue with --resume auto")
    # The deepspeed launcher appends --local_rank=N.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.1.max_steps=50 train.seed=1")
    args = parser.parse_args(argv)
    if args.resume not in ("auto", "none", "weights"):
        parser.error(f"--resume must be auto, none or weights, got {args.resume!r}")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        parser.error("--stop-after-steps must be >= 1")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        return fail(e)
    from janusflow.data.mixture import DataError
    from janusflow.train.trainer import NonFiniteError, ResumeError, Trainer

    try:
        Trainer(recipe, resume=args.resume, stop_after_steps=args.stop_after_steps).run()
    except (ValueError, OSError, DataError, NonFiniteError, ResumeError) as e:  # bad input, full disk, broken data
        return fail(e)
    return 0


def fail(error: Exception) -> int:
    print(f"train.py: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
