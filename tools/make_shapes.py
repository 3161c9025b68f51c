"""Write the procedural shapes dataset to disk (all formats), and optionally a preview grid of samples.

    python tools/make_shapes.py --out runs/data/shapes --num-train 6000 --num-val 256 --image-size 64 \
        --max-objects 2 --seed 0 --preview shapes_preview.png
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

from PIL import Image, ImageDraw

from janusflow.data.shapes import make_sample, read_manifest, write_shapes_dataset


def preview(path: Path, seed: int, image_size: int, max_objects: int, n: int = 16, cols: int = 4) -> None:
    """A grid of ``n`` training samples, each shown at least 128 px with its caption and first QA pair below."""
    scale = max(1, -(-128 // image_size))
    tile, text_h = image_size * scale, 48
    rows = -(-n // cols)
    grid = Image.new("RGB", (cols * (tile + 8), rows * (tile + text_h + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        s = make_sample(seed, "train", i, image_size, max_objects)
        x, y = (i % cols) * (tile + 8) + 4, (i // cols) * (tile + text_h + 8) + 4
        grid.paste(s.image.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        q, a = s.qa[0]
        lines = textwrap.wrap(s.caption, width=tile // 5)[:2] + textwrap.wrap(f"{q} -> {a}", width=tile // 5)[:2]
        draw.multiline_text((x, y + tile + 1), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset folder (an older shapes dataset there is replaced)")
    p.add_argument("--num-train", type=int, default=6000)
    p.add_argument("--num-val", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-objects", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset tar shard")
    p.add_argument("--preview", type=Path, default=None, help="also write a PNG grid of 16 training samples")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    root = write_shapes_dataset(
        args.out, args.num_train, args.num_val, args.image_size, args.max_objects, args.seed, args.shard_size
    )
    seconds = time.perf_counter() - t0
    manifest = read_manifest(root) or {}
    size_mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
    print(f"shapes dataset at {root} ({size_mb:.1f} MiB, {seconds:.1f} s)")
    for split, info in manifest.get("splits", {}).items():
        print(
            f"  {split}: {info['num_images']} images in {info['images']}/; gen: {info['gen_jsonl']} + "
            f"{len(info['gen_tar'])} tar shard(s); und: {info['und_json']}; text: {info['text_jsonl']}; "
            f"ground truth: {info['scenes_jsonl']}"
        )
    if args.preview is not None:
        preview(args.preview, args.seed, args.image_size, args.max_objects)
        print(f"preview grid: {args.preview}")


if __name__ == "__main__":
    main()
