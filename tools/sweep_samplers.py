"""Sampler settings against quality on held-out shapes data: shapes-GenEval, FD and NFE per setting, one table.

    python tools/sweep_samplers.py --model runs/2to8/export --data runs/_cache/shapes-XXXX --num-geneval 32 \
        --num-fd-images 128 --out sweep.json --grid sweep.png

Every setting draws the same prompts from the same noise (--seed); the settings are
janusflow.eval.sampler_sweep.default_settings (--only picks some by their position in that list).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from janusflow.eval.runner import load_eval_data
from janusflow.eval.sampler_sweep import SweepRow, default_settings, evaluate_setting, fd_features, markdown_table
from janusflow.imaging import labelled_grid
from janusflow.pipeline import PipelineError, load_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir (or a run dir with export/)")
    p.add_argument("--data", required=True, help="shapes dataset dir (gen_val.jsonl, und_val.json)")
    p.add_argument("--num-geneval", type=int, default=32, help="shapes-GenEval prompts per category")
    p.add_argument("--num-fd-images", type=int, default=128, help="held-out captions (and images) for FD")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--shift", type=float, default=3.0, help="the time shift of the shifted settings")
    p.add_argument("--interval", type=float, nargs=2, default=[0.15, 0.8], metavar=("A", "B"),
                   help="the CFG interval of the interval settings")
    p.add_argument("--only", type=int, nargs="+", help="positions (0-based) of the settings to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--grid", help="write the first GenEval images of every setting as one labelled grid here")
    args = p.parse_args(argv)
    for name in ("num_geneval", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_fd_images < 2:
        p.error("--num-fd-images must be >= 2 (FD fits a covariance)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = default_settings(args.shift, tuple(args.interval))
    if args.only:
        if not all(0 <= i < len(settings) for i in args.only):
            print(f"sweep_samplers.py: error: --only takes positions 0..{len(settings) - 1}", file=sys.stderr)
            return 2
        settings = [settings[i] for i in args.only]
    try:
        pipe = load_pipeline(args.model, device=args.device, dtype=torch.float32)
        data = load_eval_data(args.data, args.num_fd_images, num_vqa=1)
    except (PipelineError, ValueError, OSError) as e:
        print(f"sweep_samplers.py: error: {e}", file=sys.stderr)
        return 2
    real = fd_features(pipe, data.images[:args.num_fd_images])
    rows = []
    for setting in tqdm(settings, desc="settings", unit="setting"):
        start = time.time()
        rows.append(evaluate_setting(pipe, data, setting, num_geneval_per_category=args.num_geneval,
                                     num_fd_images=args.num_fd_images, real_features=real, cfg_weight=args.cfg,
                                     seed=args.seed, batch_size=args.batch_size))
        tqdm.write(f"{setting.name}: NFE {rows[-1].nfe:g}, GenEval {rows[-1].geneval['overall']:.3f}, "
                   f"FD {rows[-1].fd:.3f} ({time.time() - start:.0f} s)")
    print(markdown_table(rows))
    write_outputs(args, rows)
    return 0


def write_outputs(args: argparse.Namespace, rows: list[SweepRow]) -> None:
    """--out: the rows as JSON; --grid: the first GenEval images of each setting, a row per setting."""
    if args.out:
        dump = [{"setting": asdict(r.setting), "nfe": r.nfe, "geneval": r.geneval, "fd": r.fd, "seconds": r.seconds}
                for r in rows]
        Path(args.out).write_text(json.dumps({"rows": dump, "settings": vars(args)}, indent=2))
    if args.grid:
        cols = len(rows[0].samples)
        labelled_grid([im for r in rows for im in r.samples], [r.setting.name for r in rows], cols=cols).save(args.grid)


if __name__ == "__main__":
    sys.exit(main())
