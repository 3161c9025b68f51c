"""Image grids with captions, for sample PNGs written during training and by tools/sample.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def image_grid(images: list[Image.Image], labels: list[str] | None = None, cols: int = 4,
               cell: int = 128, label_lines: int = 2) -> Image.Image:
    """Tile images (upscaled to ``cell`` px, nearest) with up to ``label_lines`` of text under each."""
    font = ImageFont.load_default()
    line_h = 11
    text_h = line_h * label_lines + 4 if labels else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, cell // 6)
    for i, img in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        if labels:
            for j, line in enumerate(textwrap.wrap(labels[i], chars)[:label_lines]):
                draw.text((x + 2, y + cell + 2 + j * line_h), line, fill="black", font=font)
    return grid


def save_grid(images: list[Image.Image], path: str | Path, labels: list[str] | None = None, cols: int = 4,
              cell: int = 128) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, labels, cols, cell).save(path)
    return path
