"""The evaluation flags shared by tools/compare_repa.py and tools/ablations.py, and the runner kwargs they give."""

from __future__ import annotations

import argparse


def add_eval_args(p: argparse.ArgumentParser) -> None:
    # Defaults sized so that the default recipe's comparison (17 evaluations) fits in ~40 min on 2 CPU cores.
    p.add_argument("--num-geneval", type=int, default=8, help="GenEval prompts per category")
    p.add_argument("--num-fd-images", type=int, default=128, help="generated and held-out images for FD")
    p.add_argument("--num-vqa", type=int, default=64, help="held-out questions")
    p.add_argument("--num-rf-images", type=int, default=32, help="held-out images for the RF validation loss")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps of the evaluation sampler")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (prompts, noise)")


def check_eval_args(p: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...] = ()) -> None:
    """Counts must be >= 1 (``positive`` names further optional ones); FD needs two images for a covariance."""
    for name in ("num_geneval", "num_vqa", "num_rf_images", "sample_steps", *positive):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_fd_images < 2:
        p.error("--num-fd-images must be >= 2")


def eval_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of janusflow.eval.runner.evaluate_model / evaluate_export."""
    return dict(num_geneval_per_category=args.num_geneval, num_fd_images=args.num_fd_images, num_vqa=args.num_vqa,
                num_rf_images=args.num_rf_images, steps=args.sample_steps, cfg_weight=args.cfg, seed=args.seed)
