"""Text-to-image sampling: solve the rectified-flow ODE with CFG and write one PNG per image plus a grid.

    python tools/sample.py --model runs/2to8/export --prompt "a red circle" --prompt "two blue squares" \
        --num-images 4 --steps 30 --cfg 2.0 --seed 0 --out samples
    python tools/sample.py --model JanusFlow-1.3B --vae sdxl-vae --prompts prompts.txt --dtype bfloat16

Files are named ``{prompt-slug}-seed{seed}-{index}.png``: the same seed and index give the same image.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from janusflow.eval.cli import check_sampler_flags
from janusflow.imaging import labelled_grid
from janusflow.pipeline import DTYPES, load_pipeline, slug
from janusflow.sampling import SOLVERS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir, a run dir with export/, or an official dir")
    p.add_argument("--vae", help="AutoencoderKL directory (default: MODEL/vae)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance weight w")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--solver", choices=SOLVERS, default="euler",
                   help="euler: the official ODE loop; heun/midpoint/rk4/dopri5: torchdiffeq; sde: Euler-Maruyama with "
                        "the ODE's marginals")
    p.add_argument("--sde-noise", type=float, default=1.0,
                   help="eta of --solver sde: the diffusion w(t) = eta * (1 - t) (0 = the ODE)")
    p.add_argument("--time-shift", type=float, default=1.0, metavar="S",
                   help="SD3 time shift of the fixed-step grid, t' = t / (S - (S - 1) t); 1 = the official k / N")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("A", "B"),
                   help="apply CFG only for t in [A, B] (t = 0 noise, 1 data), w = 1 elsewhere; 0 1 = always")
    p.add_argument("--compile", action="store_true",
                   help="run the sampling step through torch.compile (CUDA graphs on a GPU): the same images, faster "
                        "once the first batch has compiled")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples", help="output directory")
    args = p.parse_args(argv)
    if args.prompts:
        try:
            args.prompt += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"cannot read prompts file {args.prompts}: {getattr(e, 'strerror', None) or e}")
    if not args.prompt:
        p.error("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if not (math.isfinite(args.sde_noise) and args.sde_noise >= 0):
        p.error(f"--sde-noise must be a number >= 0, got {args.sde_noise}")
    check_sampler_flags(p, args)
    return args


def fail(message: str) -> None:
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    try:
        pipe = load_pipeline(args.model, args.vae, device=args.device, dtype=args.dtype)
        for prompt in args.prompt:
            pipe.gen_ids(prompt)  # fail on a too-long prompt before any work
    except (FileNotFoundError, ValueError) as e:  # missing files, too-long prompts, weights not matching the config
        fail(str(e))
    with tqdm(desc="sampling", unit="step") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        start = time.perf_counter()
        images = pipe.generate(prompts, seed=args.seed, steps=args.steps, cfg_weight=args.cfg, solver=args.solver,
                               sde_noise=args.sde_noise, batch_size=args.batch_size, progress=progress,
                               time_shift=args.time_shift, cfg_interval=args.cfg_interval, compile=args.compile)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, (prompt, image) in enumerate(zip(prompts, images)):
        image.save(out / f"{slug(prompt)}-seed{args.seed}-{index:03d}.png")
    grid = out / f"grid-seed{args.seed}.png"
    labelled_grid(images, args.prompt, cols=args.num_images).save(grid)
    per_batch = pipe.last_nfe / pipe.last_num_batches
    print(f"{len(images)} images in {seconds:.2f}s ({len(images) / seconds:.2f} images/s); "
          f"NFE {per_batch:g} per batch ({args.solver}, {pipe.last_num_batches} batches); wrote {out}/ and {grid}")


if __name__ == "__main__":
    main()
