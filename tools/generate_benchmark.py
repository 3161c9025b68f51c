"""Draw a text-to-image benchmark's images in the folder layout its official scorer reads (janusflow.eval.benchmarks).

    python tools/generate_benchmark.py geneval --model runs/2to8/export --metadata evaluation_metadata.jsonl \
        --out geneval_images                       # <out>/<index:05d>/{metadata.jsonl, samples/<k:04d>.png}
    python tools/generate_benchmark.py dpg --model JanusFlow-1.3B --vae sdxl-vae --prompts ELLA/dpg_bench/prompts \
        --out dpg_images                           # <out>/<stem>.png, 4 samples tiled 2 x 2
    python tools/generate_benchmark.py mjhq --model JanusFlow-1.3B --vae sdxl-vae --meta meta_data.json \
        --out mjhq_images                          # <out>/<category>/<id>.png

The sampler defaults are the paper's evaluation settings (Euler, 30 steps, CFG w = 2). A rerun skips the
prompts already finished; prompt p's sample k always starts from the noise (seed, p * K + k).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from janusflow.eval.benchmarks import (
    BenchmarkError,
    DPGLayout,
    GenEvalLayout,
    MJHQLayout,
    generate_benchmark,
    read_dpg,
    read_geneval,
    read_mjhq,
)
from janusflow.eval.cli import check_sampler_flags
from janusflow.pipeline import DTYPES, PipelineError, load_pipeline
from janusflow.sampling import SOLVERS

SCORE_HINTS = {
    "geneval": "score it with GenEval: python evaluation/evaluate_images.py {out} --outfile results.jsonl "
               "--model-path <detector dir>, then evaluation/summary_scores.py results.jsonl",
    "dpg": "score it with DPG-Bench: bash dpg_bench/dist_eval.sh {out} {resolution}",
    "mjhq": "score it with: python tools/fid.py --real <mjhq30k_imgs dir> --fake {out} --inception <weights> "
            "--per-category",
}


def sampler_parent() -> argparse.ArgumentParser:
    """The flags every benchmark shares: model, output, sampler."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", required=True, help="exported model dir, a run dir with export/, or an official dir")
    p.add_argument("--vae", help="AutoencoderKL directory (default: MODEL/vae)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same one to resume)")
    p.add_argument("--steps", type=int, default=30, help="solver steps (paper: 30)")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance weight w (paper: 2)")
    p.add_argument("--solver", choices=SOLVERS, default="euler")
    p.add_argument("--time-shift", type=float, default=1.0, metavar="S", help="SD3 time shift (1 = official)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("A", "B"),
                   help="guidance only for t in [A, B] (0 1 = official)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="images per sampler batch")
    p.add_argument("--limit", type=int, help="only the first N prompts (a quick look)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True)
    parent = sampler_parent()
    geneval = sub.add_parser("geneval", parents=[parent], help="GenEval (djghosh13/geneval)")
    geneval.add_argument("--metadata", required=True, help="GenEval's prompts/evaluation_metadata.jsonl")
    geneval.add_argument("--images-per-prompt", type=int, default=4, help="samples per prompt (paper: 4)")
    sub.add_parser("dpg", parents=[parent], help="DPG-Bench (ELLA dpg_bench/)").add_argument(
        "--prompts", required=True, help="DPG-Bench's dpg_bench/prompts folder (<stem>.txt files)")
    sub.add_parser("mjhq", parents=[parent], help="MJHQ-30K (playgroundai)").add_argument(
        "--meta", required=True, help="MJHQ-30K's meta_data.json")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "limit", "images_per_prompt"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    check_sampler_flags(p, args)


def items_and_layout(args: argparse.Namespace):
    out = Path(args.out)
    if args.benchmark == "geneval":
        return read_geneval(Path(args.metadata)), GenEvalLayout(out, args.images_per_prompt)
    if args.benchmark == "dpg":
        return read_dpg(Path(args.prompts)), DPGLayout(out)
    return read_mjhq(Path(args.meta)), MJHQLayout(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        items, layout = items_and_layout(args)
        pipe = load_pipeline(args.model, args.vae, device=args.device, dtype=args.dtype)
        counts = generate_benchmark(pipe, items[:args.limit], layout, seed=args.seed, batch_size=args.batch_size,
                                    steps=args.steps, cfg_weight=args.cfg, solver=args.solver,
                                    time_shift=args.time_shift, cfg_interval=args.cfg_interval)
    except (BenchmarkError, PipelineError, FileNotFoundError, ValueError) as e:
        print(f"generate_benchmark.py: error: {e}", file=sys.stderr)
        return 2
    hint = SCORE_HINTS[args.benchmark].format(out=args.out, resolution=pipe.model.config.gen_image_size)
    print(f"{counts['generated']} prompts drawn, {counts['skipped']} already done, in {args.out}; {hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
