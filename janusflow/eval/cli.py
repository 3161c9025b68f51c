"""The evaluation flags of tools/evaluate.py, tools/compare_repa.py and tools/ablations.py, and the keyword
arguments of janusflow.eval.runner they give."""

from __future__ import annotations

import argparse
import math

# The comparison's defaults: sized so that the default recipe's REPA comparison (17 evaluations) fits in ~40 min
# on 2 CPU cores; tools/evaluate.py raises them.
COMPARISON_DEFAULTS = dict(num_geneval=8, num_fd_images=128, num_vqa=64, num_rf_images=32, sample_steps=20)


def add_eval_args(p: argparse.ArgumentParser, num_geneval: int, num_fd_images: int, num_vqa: int,
                  num_rf_images: int, sample_steps: int) -> None:
    p.add_argument("--num-geneval", type=int, default=num_geneval, help="shapes-GenEval prompts per category")
    p.add_argument("--num-fd-images", type=int, default=num_fd_images, help="generated and held-out images for FD")
    p.add_argument("--num-vqa", type=int, default=num_vqa, help="held-out questions")
    p.add_argument("--num-rf-images", type=int, default=num_rf_images,
                   help="held-out images for the RF validation loss")
    p.add_argument("--sample-steps", type=int, default=sample_steps,
                   help="Euler steps of the evaluation sampler")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (prompts, noise)")
    p.add_argument("--batch-size", type=int, default=32, help="images (or questions) per batch")


def check_eval_args(p: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...] = ()) -> None:
    """Counts must be >= 1 (``positive`` names further optional ones); FD needs two images for a covariance."""
    for name in ("num_geneval", "num_vqa", "num_rf_images", "sample_steps", "batch_size", *positive):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_fd_images < 2:
        p.error("--num-fd-images must be >= 2 (FD fits a covariance)")
    if not math.isfinite(args.cfg):
        p.error(f"--cfg must be a finite number, got {args.cfg}")


def eval_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of janusflow.eval.runner.evaluate_model / evaluate_export."""
    return dict(num_geneval_per_category=args.num_geneval, num_fd_images=args.num_fd_images, num_vqa=args.num_vqa,
                num_rf_images=args.num_rf_images, steps=args.sample_steps, cfg_weight=args.cfg, seed=args.seed,
                batch_size=args.batch_size)


def check_sampler_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--cfg finite, --time-shift / --cfg-interval as janusflow.sampling accepts them (the interval made a tuple)."""
    from janusflow.sampling import check_sampler_options

    if not math.isfinite(args.cfg):
        p.error(f"--cfg must be a finite number, got {args.cfg}")
    args.cfg_interval = tuple(args.cfg_interval)
    try:
        check_sampler_options(args.solver, args.time_shift, args.cfg_interval)
    except ValueError as e:
        p.error(f"--{str(e).replace('_', '-')}")


def format_scores(scores: dict) -> str:
    """A column of ``name  value`` lines (floats to 4 decimals)."""
    width = max(map(len, scores))
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in scores.items())
