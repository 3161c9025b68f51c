"""Evaluate an exported model on held-out shapes data: shapes-GenEval, FD, SigLIP score, VQA accuracy, RF val loss.

    python tools/evaluate.py --model runs/2to8/export --data runs/_cache/shapes-XXXX --out results.json
    python tools/evaluate.py --model runs/2to8 --data DIR --siglip runs/_cache/siglip-XXXX   # + SigLIP score
    python tools/evaluate.py --model runs/2to8 --data DIR --num-fd-images 128 --sample-steps 30 --cfg 2.0 --seed 1

The numbers are a function of the weights and --seed only (prompts, noise); see janusflow/eval/runner.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from janusflow.eval.cli import add_eval_args, check_eval_args, eval_kwargs, format_scores
from janusflow.eval.runner import evaluate_export
from janusflow.pipeline import PipelineError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir (or a run dir with export/)")
    p.add_argument("--data", required=True, help="shapes dataset dir (gen_val.jsonl, und_val.json)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--siglip", help="the prep's SigLIP folder (siglip.pt + text_tower.pt): adds the SigLIP "
                                    "image-text score of the FD images vs their captions")
    p.add_argument("--tasks", default="gen,und", help="gen (all but VQA), und (VQA) or gen,und")
    add_eval_args(p, num_geneval=16, num_fd_images=256, num_vqa=128, num_rf_images=64, sample_steps=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    check_eval_args(p, args)
    args.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not args.tasks or set(args.tasks) - {"gen", "und"}:
        p.error("--tasks must be gen, und or gen,und")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        results = evaluate_export(args.model, args.data, device=args.device, siglip_dir=args.siglip,
                                  tasks=args.tasks, **eval_kwargs(args))
    except (PipelineError, ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(format_scores(results))
    print(f"({time.time() - start:.1f} s)")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        Path(args.out).write_text(json.dumps({"results": results, "settings": settings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
