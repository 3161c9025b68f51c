"""Text-to-image benchmarks of the paper: their prompt files and the folder layouts their official scorers read.

GenEval (github djghosh13/geneval): ``evaluation_metadata.jsonl``, one JSON object per line with a "prompt";
    <out>/<index:05d>/metadata.jsonl        that prompt's line, as is
    <out>/<index:05d>/samples/<k:04d>.png   K samples (the paper: 4)
DPG-Bench (github TencentQQGYLab/ELLA, dpg_bench/): a folder of ``<stem>.txt`` files, one prompt each;
    <out>/<stem>.png                        4 samples of R x R tiled 2 x 2 (k = 0 1 / 2 3), what
                                            compute_dpg_bench.py crops with --resolution R --pic-num 4
MJHQ-30K (playgroundai): ``meta_data.json`` = {id: {"category": ..., "prompt": ...}};
    <out>/<category>/<id>.png               one image per prompt, the folders the real images unzip to

    items = read_geneval(Path("evaluation_metadata.jsonl"))
    generate_benchmark(pipe, items, GenEvalLayout(out, images_per_prompt=4), seed=0, steps=30, cfg_weight=2.0)

Sample k of the prompt at position p starts from the noise index p * K + k under the seed, so a prompt's
images do not depend on the batch or on which prompts were finished before: a rerun skips finished prompts
and draws the rest exactly as one uninterrupted run would. Every finished output appears in one rename,
so an interrupted run leaves no half-written prompt where the scorers look.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from janusflow.pipeline import Pipeline, PipelineError

TMP_SUFFIX = ".tmp"


class BenchmarkError(ValueError):
    """A malformed prompt file or output folder: the message names the file."""


@dataclass(frozen=True)
class Item:
    """One prompt: its position in the prompt file (which fixes its noise), its output key and text."""

    index: int
    key: str
    prompt: str
    line: str = ""
    """GenEval: the metadata line, written back as the folder's metadata.jsonl."""


# ----------------------------------------------------------------------------- prompt files


def read_geneval(path: Path) -> list[Item]:
    """evaluation_metadata.jsonl -> one Item per non-empty line, keyed by its zero-padded index."""
    items = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise BenchmarkError(f"{path}, line {number}: no \"prompt\" string")
        items.append(Item(len(items), f"{len(items):05d}", prompt, line.strip()))
    return _non_empty(items, path)


def read_dpg(folder: Path) -> list[Item]:
    """A DPG-Bench prompts folder -> one Item per <stem>.txt, in sorted file-name order."""
    if not folder.is_dir():
        raise BenchmarkError(f"{folder} is not a folder of DPG-Bench prompt files (<stem>.txt)")
    items = []
    for file in sorted(folder.glob("*.txt")):
        prompt = _read_text(file).strip()
        if not prompt:
            raise BenchmarkError(f"{file} is empty")
        items.append(Item(len(items), file.stem, prompt))
    return _non_empty(items, folder)


def read_mjhq(path: Path) -> list[Item]:
    """MJHQ-30K meta_data.json -> one Item per image id, keyed "<category>/<id>", in file order."""
    try:
        meta = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(meta, dict):
        raise BenchmarkError(f"{path}: expected an object {{id: {{\"category\": ..., \"prompt\": ...}}}}")
    items = []
    for image_id, record in meta.items():
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("category", "prompt")):
            raise BenchmarkError(f"{path}: entry {image_id!r} lacks a \"category\" or \"prompt\" string")
        for part in (image_id, record["category"]):
            if not part or part in (".", "..") or "/" in part or "\\" in part:
                raise BenchmarkError(f"{path}: entry {image_id!r}: {part!r} is not a usable file or folder name")
        items.append(Item(len(items), f"{record['category']}/{image_id}", record["prompt"]))
    return _non_empty(items, path)


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _non_empty(items: list[Item], where: Path) -> list[Item]:
    if not items:
        raise BenchmarkError(f"{where} holds no prompts")
    return items


# ----------------------------------------------------------------------------- layouts


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG under a hidden temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def remove_stale_tmp(out: Path) -> None:
    """Delete what an interrupted run left under a temporary name (ours start with "." and end in .tmp)."""
    for path in out.rglob(f".*{TMP_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class GenEvalLayout:
    """<out>/<index:05d>/{metadata.jsonl, samples/<k:04d>.png}: written in a hidden folder, then renamed."""

    def __init__(self, out: Path, images_per_prompt: int = 4):
        self.out, self.images_per_prompt = Path(out), images_per_prompt

    def is_done(self, item: Item) -> bool:
        folder = self.out / item.key
        if not (folder / "metadata.jsonl").exists():
            return False
        if (folder / "metadata.jsonl").read_text(encoding="utf-8").strip() != item.line:
            raise BenchmarkError(f"{folder / 'metadata.jsonl'} holds another prompt than line {item.index + 1} of the "
                                 "metadata file: pass a fresh --out")
        return all((folder / "samples" / f"{k:04d}.png").exists() for k in range(self.images_per_prompt))

    def write(self, item: Item, images: Sequence[Image.Image]) -> None:
        final = self.out / item.key
        tmp = self.out / f".{item.key}{TMP_SUFFIX}"
        (tmp / "samples").mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            image.save(tmp / "samples" / f"{k:04d}.png")
        (tmp / "metadata.jsonl").write_text(item.line + "\n", encoding="utf-8")
        if final.exists():  # a folder with fewer samples than asked for now
            shutil.rmtree(final)
        os.replace(tmp, final)


class DPGLayout:
    """<out>/<stem>.png: the prompt's 4 samples tiled 2 x 2, row by row."""

    images_per_prompt = 4

    def __init__(self, out: Path):
        self.out = Path(out)

    def is_done(self, item: Item) -> bool:
        return (self.out / f"{item.key}.png").exists()

    def write(self, item: Item, images: Sequence[Image.Image]) -> None:
        save_png(tile_2x2(images), self.out / f"{item.key}.png")


class MJHQLayout:
    """<out>/<category>/<id>.png: one image per prompt."""

    images_per_prompt = 1

    def __init__(self, out: Path):
        self.out = Path(out)

    def is_done(self, item: Item) -> bool:
        return (self.out / f"{item.key}.png").exists()

    def write(self, item: Item, images: Sequence[Image.Image]) -> None:
        path = self.out / f"{item.key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(images[0], path)


Layout = GenEvalLayout | DPGLayout | MJHQLayout


def tile_2x2(images: Sequence[Image.Image]) -> Image.Image:
    """Four R x R images -> one 2R x 2R image: 0 top left, 1 top right, 2 bottom left, 3 bottom right."""
    if len(images) != 4 or len({im.size for im in images}) != 1:
        raise ValueError(f"tile_2x2 needs 4 images of one size, got {[im.size for im in images]}")
    w, h = images[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for k, image in enumerate(images):
        grid.paste(image, ((k % 2) * w, (k // 2) * h))
    return grid


# ----------------------------------------------------------------------------- generation


def generate_benchmark(pipe: Pipeline, items: Sequence[Item], layout: Layout, *, seed: int = 0,
                       batch_size: int = 8, show_progress: bool = True, **sampling) -> dict[str, int]:
    """Draw the images of every unfinished item and write them in ``layout``; returns the counts.

    ``sampling``: the keyword arguments of ``Pipeline.generate`` (steps, cfg_weight, solver, time_shift,
    cfg_interval, ...). Prompts are grouped so that one call draws about ``batch_size`` images.
    """
    layout.out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(layout.out)
    pending = [item for item in items if not layout.is_done(item)]
    check_prompt_lengths(pipe, pending)
    k = layout.images_per_prompt
    per_call = max(1, batch_size // k)
    with tqdm(total=len(items), initial=len(items) - len(pending), unit="prompt", disable=not show_progress,
              desc=type(layout).__name__.removesuffix("Layout")) as bar:
        for start in range(0, len(pending), per_call):
            group = pending[start:start + per_call]
            prompts = [item.prompt for item in group for _ in range(k)]
            indices = [item.index * k + j for item in group for j in range(k)]
            images = pipe.generate(prompts, seed=seed, batch_size=batch_size, image_indices=indices, **sampling)
            for g, item in enumerate(group):
                layout.write(item, images[g * k:(g + 1) * k])
                bar.update(1)
    return {"prompts": len(items), "generated": len(pending), "skipped": len(items) - len(pending)}


def check_prompt_lengths(pipe: Pipeline, items: Sequence[Item]) -> None:
    """Fail before any work on a prompt that does not fit the context, naming it."""
    for item in items:
        try:
            pipe.gen_ids(item.prompt)
        except PipelineError as e:
            raise BenchmarkError(f"prompt {item.key}: {e}") from None
