"""FID of a folder of generated images against a folder of reference images (janusflow.eval.fid, torchmetrics).

    python tools/fid.py --real mjhq30k_imgs --fake mjhq_images --inception weights-inception-2015-12-05-6726825d.pth \
        --per-category --out fid.json          # MJHQ-30K FID-30k, overall and per category

The Inception weights are torch-fidelity's port of the TF FID network, read from --inception (nothing is
downloaded; the file is at the URL printed when it is missing). Both folders are searched recursively.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from janusflow.eval.cli import format_scores
from janusflow.eval.fid import FIDError, folder_fid, inception_extractor


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="folder of reference images (e.g. the unzipped mjhq30k_imgs)")
    p.add_argument("--fake", required=True, help="folder of generated images (e.g. generate_benchmark.py mjhq's --out)")
    p.add_argument("--inception", required=True,
                   help="torch-fidelity's FID Inception weights (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--per-category", action="store_true", help="also one FID per subfolder found in both folders")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the scores as JSON here")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        scores = folder_fid(args.real, args.fake, inception_extractor(args.inception), per_category=args.per_category,
                            batch_size=args.batch_size, device=args.device)
    except FIDError as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        return 2
    print(format_scores(scores))
    print(f"({time.time() - start:.1f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"scores": scores, "settings": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
