"""Readers of real dataset formats (the image -> tensor steps live in janusflow.data.transforms).

Formats: LLaVA-style conversation JSON (understanding), image-caption JSONL and WebDataset tar shards
(generation), text JSONL (text-only). Every reader is random-access; a bad record (missing or corrupt image,
broken JSON line, empty text or conversation) gives ``None`` from ``__getitem__`` and is counted by reason in
``stats`` when read -- bad data never raises. A failure no check foresaw is counted as ``unexpected_error``
(a reader bug to fix, still not fatal). Images of any mode come back as RGB.
"""

from __future__ import annotations

import abc
import collections
import glob
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from janusflow.data.index_file import SUFFIX as INDEX_SUFFIX
from janusflow.data.json_list import JsonList, NotAListError
from janusflow.data.shard_set import Member, ShardSample, ShardSetIndex
from janusflow.io import BrokenLine, read_jsonl

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt", "caption", "text")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant"}
IMAGE_TOKEN = "<image>"


@dataclass
class CaptionRecord:
    image: Image.Image | None
    """None when only the caption was read (the data stream's caches hold what the image would give)."""
    caption: str


@dataclass
class ConversationRecord:
    image: Image.Image | None
    turns: list[tuple[str, str]]
    """(role, text) with role "user" or "assistant"; the <image> placeholder removed, text stripped."""


@dataclass
class TextRecord:
    text: str


Record = CaptionRecord | ConversationRecord | TextRecord


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is its key in ``SourceDataset.stats``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB version of ``img``: transparency composited on white, 16-bit and float greyscale rescaled to 8 bit."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # PIL's own I/F -> L conversion clips instead of rescaling, which turns 16-bit images white.
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "") -> Image.Image:
    """Fully decode image bytes to RGB (so truncation shows here, not later); raises BadRecord."""
    if not data:
        raise BadRecord("bad_image", f"{name}: zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.width == 0 or img.height == 0:
            raise BadRecord("empty_image", f"{name}: size {img.size}")
        return to_rgb(img)
    except BadRecord:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, zlib errors ...
        raise BadRecord("bad_image", f"{name}: {type(e).__name__}: {e}") from e


def load_image(path: Path) -> Image.Image:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise BadRecord("missing_file", str(path)) from e
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise BadRecord("unreadable_file", f"{path}: {e}") from e
    return decode_image(data, str(path))


# ----------------------------------------------------------------------------- datasets


class SourceDataset(abc.ABC):
    """Random-access records of one dataset; ``self[i]`` is a record or None (bad, counted in ``stats``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.stats: collections.Counter[str] = collections.Counter()
        self.last_error: dict[str, str] = {}
        """The latest message per failure reason, for error reports."""
        self.last_reason: str | None = None
        """The reason of the latest bad record (what the data stream counts per task)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _load(self, i: int) -> Record:
        """The record at index i (0 <= i < len); raises BadRecord for unusable data."""

    def count_bad(self, reason: str, detail: str) -> None:
        """Count a bad record under ``reason`` (the stats and error reports show it)."""
        self.stats[reason] += 1
        self.last_error[reason] = detail
        self.last_reason = reason

    def __getitem__(self, i: int) -> Record | None:
        return self._guarded(i, self._load)

    def _guarded(self, i: int, load: Callable[[int], Record]) -> Record | None:
        """``load(i)``, or None with the reason counted when the record is unusable."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} records of {self.path}")
        try:
            record = load(i % n)
        except BadRecord as e:
            self.count_bad(e.reason, str(e))
            return None
        except Exception as e:  # a malformed record of a kind not foreseen must not stop training either
            self.count_bad("unexpected_error", f"record {i}: {type(e).__name__}: {e}")
            return None
        self.stats["ok"] += 1
        return record

    def __iter__(self) -> Iterator[Record | None]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} records, stats={dict(self.stats)})"


def _row(rows: Sequence[Any], i: int) -> Any:
    row = rows[i]
    if isinstance(row, BrokenLine):
        raise BadRecord("bad_json", row.detail)
    return row


def _image_path(root: Path, rel: Any) -> Path:
    if isinstance(rel, list) and len(rel) == 1:
        rel = rel[0]
    if isinstance(rel, list):
        raise BadRecord("multi_image", f"{len(rel)} images per record are not supported")
    if not isinstance(rel, str) or not rel.strip():
        raise BadRecord("bad_record", f"image field {rel!r}")
    return root / rel.strip()


def _text(value: Any, reason: str = "empty_text") -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(reason, f"text {value!r}")
    return value.strip()


class LlavaJsonSource(SourceDataset):
    """LLaVA-style conversations: a JSON list (or JSONL) of ``{"image": rel_path?, "conversations": [...]}``.

    Turns are ``{"from": "human"|"gpt", "value": ...}`` (or ``{"role": "user"|"assistant", "content": ...}``);
    system turns are dropped. A record without "image" is text-only (image None). A JSON list is indexed once
    (``janusflow.data.json_list``: each record's byte span, beside the file or in the cache) and a record is parsed
    when read, so opening LLaVA-Instruct's 665k records takes neither seconds nor a gigabyte per rank.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        super().__init__(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if self.path.suffix == ".jsonl":
            self.entries = read_jsonl(self.path)
        else:
            try:
                self.entries = JsonList(self.path)  # parsed one record at a time, over a stored byte-span index
            except NotAListError as e:
                raise ValueError(f"{self.path}: {e}") from e
            except ValueError as e:
                raise ValueError(f"{self.path}: not valid JSON ({e})") from e

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> ConversationRecord:
        entry = _row(self.entries, i)
        if not isinstance(entry, dict):
            raise BadRecord("bad_record", f"record {i} is a {type(entry).__name__}")
        conv = entry.get("conversations", entry.get("messages"))
        if not isinstance(conv, list) or not conv:
            raise BadRecord("empty_conversation", f"record {i}")
        turns, has_placeholder = [], False
        for t in conv:
            if not isinstance(t, dict):
                raise BadRecord("bad_record", f"record {i}: turn {t!r}")
            role, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
            if role == "system":
                continue
            if not isinstance(role, str) or role not in ROLES or not isinstance(value, str):
                raise BadRecord("bad_record", f"record {i}: turn role {role!r}, value {type(value).__name__}")
            has_placeholder |= IMAGE_TOKEN in value
            turns.append((ROLES[role], value.replace(IMAGE_TOKEN, "").strip()))
        if not any(role == "assistant" and text for role, text in turns):
            raise BadRecord("empty_conversation", f"record {i}: no assistant answer")
        image = None
        if entry.get("image"):
            image = load_image(_image_path(self.image_root, entry["image"]))
        elif has_placeholder:
            raise BadRecord("missing_image", f"record {i}: {IMAGE_TOKEN} in the text but no image")
        return ConversationRecord(image, turns)


class CaptionSource(SourceDataset):
    """Image-caption records whose caption can be read without the image."""

    @abc.abstractmethod
    def caption(self, i: int) -> str:
        """Record i's caption alone, its image not read; raises BadRecord."""

    def caption_record(self, i: int) -> CaptionRecord | None:
        """Record i without its image (for records whose image the data stream has cached), or None as ``self[i]``."""
        return self._guarded(i, lambda j: CaptionRecord(None, self.caption(j)))


class CaptionJsonlSource(CaptionSource):
    """Image-caption pairs: JSONL lines ``{"image": rel_path, "caption": text}`` ("text" is accepted too)."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        super().__init__(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.rows = read_jsonl(self.path)

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, i: int) -> CaptionRecord:
        row = self._dict_row(i)
        caption = _text(row.get("caption", row.get("text")))
        return CaptionRecord(load_image(_image_path(self.image_root, row.get("image"))), caption)

    def _dict_row(self, i: int) -> dict:
        row = _row(self.rows, i)
        if not isinstance(row, dict):
            raise BadRecord("bad_record", f"line record {i} is a {type(row).__name__}")
        return row

    def caption(self, i: int) -> str:
        row = self._dict_row(i)
        return _text(row.get("caption", row.get("text")))


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace expansion: ``a-{000..002}.tar`` (zero-padded ranges) and ``{x,y}`` alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        options = [str(k).zfill(width) for k in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def _shard_paths(pattern_or_paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [pattern_or_paths] if isinstance(pattern_or_paths, (str, Path)) else list(pattern_or_paths)
    paths: list[Path] = []
    for item in items:
        if Path(item).is_dir():
            found = sorted(Path(item).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in folder {item}")
            paths += found
            continue
        for p in expand_braces(str(item)):
            if glob.has_magic(p):
                matches = sorted(m for m in glob.glob(p) if not m.endswith(INDEX_SUFFIX))  # our index files
                if not matches:
                    raise FileNotFoundError(f"no WebDataset shards match {p}")
                paths += [Path(m) for m in matches]
            elif Path(p).is_file():
                paths.append(Path(p))
            else:
                raise FileNotFoundError(f"WebDataset shard not found: {p}")
    if not paths:
        raise FileNotFoundError(f"no WebDataset shards in {pattern_or_paths!r}")
    return paths


class WebDatasetSource(CaptionSource):
    """Image-caption samples in uncompressed WebDataset tar shards (img2dataset's layout), as users write them.

    Members ``KEY.png|jpg|...`` and ``KEY.txt`` (or ``KEY.json`` with a "caption"/"text" field) form one sample.
    Each shard is indexed once (``janusflow.data.shard_index``: an index file beside the shard or in the cache,
    shared by ranks and runs), so opening reads one small header per shard and reading a sample is one seek + read.
    A shard that cannot be read to the end counts as ``bad_shard``; the samples indexed before the damage stay.
    """

    def __init__(self, pattern_or_paths: str | Path | Sequence[str | Path]) -> None:
        self.shards = _shard_paths(pattern_or_paths)
        super().__init__(self.shards[0] if len(self.shards) == 1 else self.shards[0].parent)
        self.index = ShardSetIndex(self.shards, IMAGE_EXTS, (*CAPTION_EXTS, "json"))
        for si, error in self.index.errors:
            self.count_bad("bad_shard", f"{self.shards[si]}: {error}")

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, shard: int, member: Member, name: str, reason: str = "truncated_member") -> bytes:
        with open(self.shards[shard], "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        if len(data) != member.size:
            raise BadRecord(reason, f"{name}: the shard ends {member.size - len(data)} bytes early")
        return data

    def caption(self, i: int) -> str:
        return self._caption(self.index.sample(i))

    def _caption(self, sample: ShardSample) -> str:
        name = f"{self.shards[sample.shard]}:{sample.key}"
        if sample.caption is None:
            raise BadRecord("empty_text", f"{name}: no caption member")
        data = self._read(sample.shard, sample.caption, name)
        if sample.caption.ext != "json":
            return _text(data.decode("utf-8", errors="replace"))
        try:
            meta = json.loads(data)
        except ValueError as e:
            raise BadRecord("bad_json", f"{name}.json: {e}") from e
        if not isinstance(meta, dict):
            raise BadRecord("bad_json", f"{name}.json is a {type(meta).__name__}")
        return _text(meta.get("caption", meta.get("text")))

    def _load(self, i: int) -> CaptionRecord:
        sample = self.index.sample(i)
        caption = self._caption(sample)
        if sample.image is None:
            raise BadRecord("missing_file", f"{self.shards[sample.shard]}:{sample.key}: no image member")
        name = f"{self.shards[sample.shard]}:{sample.key}.{sample.image.ext}"
        data = self._read(sample.shard, sample.image, name, reason="bad_image")
        return CaptionRecord(decode_image(data, name), caption)


class TextJsonlSource(SourceDataset):
    """Text-only lines: JSONL ``{"text": ...}`` (a bare JSON string per line is accepted too)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.rows = read_jsonl(self.path)

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, i: int) -> TextRecord:
        row = _row(self.rows, i)
        if isinstance(row, dict):
            return TextRecord(_text(row.get("text")))
        if isinstance(row, str):
            return TextRecord(_text(row))
        raise BadRecord("bad_record", f"line record {i} is a {type(row).__name__}")


FORMATS = ("llava_json", "caption_jsonl", "webdataset", "text_jsonl")


def open_source(path: str | Path, format: str, image_root: str | Path | None = None) -> SourceDataset:
    """The reader for ``format`` over ``path``; image paths in JSON files are relative to ``image_root``
    (default: the JSON file's folder). For "webdataset", ``path`` is a shard, a folder of shards, a glob or a
    brace pattern (``data-{00000..00009}.tar``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r} for {path}; expected one of {FORMATS}")
    if format == "webdataset":
        return WebDatasetSource(str(path))
    if not Path(path).is_file():
        raise FileNotFoundError(f"{format} data file not found: {path}")
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image_root for {path} is not a folder: {image_root}")
    if format == "llava_json":
        return LlavaJsonSource(path, image_root)
    if format == "caption_jsonl":
        return CaptionJsonlSource(path, image_root)
    return TextJsonlSource(path)
