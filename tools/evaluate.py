"""Evaluate an exported model on held-out shapes data: shapes-GenEval, FD, SigLIP score, VQA accuracy, RF val loss.

    python tools/evaluate.py --model runs/2to8/export --data runs/_cache/shapes-XXXX --out results.json
    python tools/evaluate.py --model runs/2to8 --data DIR --siglip runs/_cache/siglip-XXXX   # + SigLIP score
    python tools/evaluate.py --model runs/2to8 --data DIR --num-fd-images 128 --steps 30 --cfg 2.0 --seed 1

The numbers are a function of the weights and --seed only (prompts, noise); see janusflow/eval/runner.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from janusflow.eval.runner import evaluate_export  # noqa: E402
from janusflow.pipeline import PipelineError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir (or a run dir with export/)")
    p.add_argument("--data", required=True, help="shapes dataset dir (gen_val.jsonl, und_val.json)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--siglip", help="the prep's SigLIP folder (siglip.pt + text_tower.pt): adds the SigLIP "
                                    "image-text score of the FD images vs their captions")
    p.add_argument("--tasks", default="gen,und", help="gen (all but VQA), und (VQA) or gen,und")
    p.add_argument("--num-geneval", type=int, default=16, help="GenEval prompts per category")
    p.add_argument("--num-fd-images", type=int, default=256, help="held-out images (and generated ones) for FD")
    p.add_argument("--num-vqa", type=int, default=128, help="held-out questions")
    p.add_argument("--num-rf-images", type=int, default=64, help="held-out images for the RF validation loss")
    p.add_argument("--steps", type=int, default=30, help="Euler steps of the sampler")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for name in ("num_geneval", "num_fd_images", "num_vqa", "num_rf_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_fd_images < 2:
        p.error("--num-fd-images must be >= 2 (FD fits a covariance)")
    if not math.isfinite(args.cfg):
        p.error(f"--cfg must be a finite number, got {args.cfg}")
    args.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not args.tasks or set(args.tasks) - {"gen", "und"}:
        p.error("--tasks must be gen, und or gen,und")
    return args


def table(results: dict[str, float]) -> str:
    width = max(map(len, results))
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in results.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        results = evaluate_export(args.model, args.data, num_geneval_per_category=args.num_geneval,
                                  num_fd_images=args.num_fd_images, num_vqa=args.num_vqa,
                                  num_rf_images=args.num_rf_images, steps=args.steps, cfg_weight=args.cfg,
                                  seed=args.seed, batch_size=args.batch_size, device=args.device,
                                  siglip_dir=args.siglip, tasks=args.tasks)
    except (PipelineError, ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"({time.time() - start:.1f} s)")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        Path(args.out).write_text(json.dumps({"results": results, "settings": settings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
