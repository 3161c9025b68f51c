"""The readers as they were before the stored indexes (commit 0b0be3a): the oracle the indexed readers must
match record for record, and the baseline of ``benchmarks/data_index.py``.

``LegacyWebDatasetSource`` scans every tar header at start-up into per-sample Python objects;
``legacy_json_list`` parses a whole JSON file into Python objects.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from janusflow.data.sources import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    BadRecord,
    CaptionRecord,
    CaptionSource,
    _shard_paths,
    _text,
    decode_image,
)


def legacy_json_list(path: Path) -> Any:
    return json.loads(Path(path).read_bytes())


class LegacyWebDatasetSource(CaptionSource):
    """Image-caption samples in uncompressed WebDataset tar shards, read with the stdlib ``tarfile``.

    Members ``KEY.png|jpg|...`` and ``KEY.txt`` (or ``KEY.json`` with a "caption"/"text" field) form one sample.
    The shards are indexed once at init (member offsets), so reading a sample is one seek + read.
    A shard that cannot be read to the end counts as ``bad_shard``; the samples indexed before the damage stay.
    """

    def __init__(self, pattern_or_paths: str | Path | Sequence[str | Path]) -> None:
        self.shards = _shard_paths(pattern_or_paths)
        super().__init__(self.shards[0] if len(self.shards) == 1 else self.shards[0].parent)
        # per sample: (shard index, key, {ext: (offset, size)})
        self.samples: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for si, shard in enumerate(self.shards):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        folder, _, base = m.name.rpartition("/")
                        stem, dot, ext = base.partition(".")
                        if not dot or not stem:
                            continue
                        key = f"{folder}/{stem}" if folder else stem
                        members.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
                    # tarfile stops quietly at a cut between members; a whole archive ends with two zero blocks
                    if shard.stat().st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
                        raise tarfile.ReadError(f"no end-of-archive blocks after byte {tar.offset} (truncated?)")
            except (tarfile.TarError, OSError, EOFError) as e:
                self.count_bad("bad_shard", f"{shard}: {type(e).__name__}: {e}")
            self.samples += [(si, key, exts) for key, exts in members.items()]

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: int, where: tuple[int, int], name: str, reason: str = "truncated_member") -> bytes:
        offset, size = where
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadRecord(reason, f"{name}: the shard ends {size - len(data)} bytes early")
        return data

    def caption(self, i: int) -> str:
        si, key, exts = self.samples[i]
        name = f"{self.shards[si]}:{key}"
        cap_ext = next((e for e in CAPTION_EXTS if e in exts), None)
        if cap_ext is not None:
            return _text(self._read(si, exts[cap_ext], name).decode("utf-8", errors="replace"))
        if "json" in exts:
            try:
                meta = json.loads(self._read(si, exts["json"], name))
            except ValueError as e:
                raise BadRecord("bad_json", f"{name}.json: {e}") from e
            if not isinstance(meta, dict):
                raise BadRecord("bad_json", f"{name}.json is a {type(meta).__name__}")
            return _text(meta.get("caption", meta.get("text")))
        raise BadRecord("empty_text", f"{name}: no caption member")

    def _load(self, i: int) -> CaptionRecord:
        si, key, exts = self.samples[i]
        name = f"{self.shards[si]}:{key}"
        caption = self.caption(i)
        img_ext = next((e for e in IMAGE_EXTS if e in exts), None)
        if img_ext is None:
            raise BadRecord("missing_file", f"{name}: no image member")
        data = self._read(si, exts[img_ext], f"{name}.{img_ext}", reason="bad_image")
        return CaptionRecord(decode_image(data, f"{name}.{img_ext}"), caption)
