"""Image grids with captions: the sample PNGs written during training and by tools/sample.py (the same layout, so
a training grid at seed S and ``tools/sample.py --seed S`` give the same picture).

    grid = labelled_grid(images, prompts, cols=4)     # a row per label, ``cols`` images each
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], cols: int, label_width: int = 240,
                  min_tile: int = 128) -> Image.Image:
    """Rows of ``cols`` images, each row headed by its label (e.g. the prompt); small images are enlarged."""
    scale = max(1, -(-min_tile // images[0].height))
    w, h = images[0].width * scale, images[0].height * scale
    font = ImageFont.load_default()
    grid = Image.new("RGB", (label_width + cols * w, len(labels) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(labels):
        text = _wrap(draw, label, font, label_width - 8, max_lines=max(1, (h - 8) // 14))
        draw.multiline_text((4, r * h + 4), text, fill="black", font=font)
        for c in range(cols):
            tile = images[r * cols + c].resize((w, h), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + c * w, r * h))
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> str:
    """Greedy word wrap to ``width`` pixels; the last kept line ends in "..." when text is cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    return "\n".join(lines)


def save_labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], path: str | Path, cols: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, labels, cols).save(path)
    return path
