"""Global random access to the samples of a list of WebDataset shards, through one memory-mapped set index.

Every shard has its own stored index (``shard_index``), built once and reused by any shard list that holds the
shard. A list of shards gets one more index, the concatenation of its shards' (kind ``webdataset-set``, at
``.shards-<hash of the list>.idx`` beside the first shard, by ``index_file``): a random read then looks into one
mapped file, however many shards there are, instead of mapping one file (and holding one descriptor) per shard.
Opening stats each shard and compares with the set index's shard table; where a shard changed (or there is no set
index yet) the shards without a valid index are indexed, ranks sharing that work, and the set index is rewritten
from the shard indexes one shard at a time.

Arrays (S shards, N samples): shard_size int64[S] and shard_mtime_ns int64[S] (what each shard's index describes),
starts int64[S + 1] (cumulative sample counts: sample i lies in shard ``bisect_right(starts, i) - 1``),
then the shards' ``samples`` and ``keys`` (``shard_index``) concatenated, key_offset counting into the whole.
Header: spec, shards (S), count (N), errors ([shard position, error] of the shards not readable to the end).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from janusflow.data import index_file
from janusflow.data.index_file import SUFFIX, VERSION, Put, StoredIndex
from janusflow.data.shard_index import KIND, NONE, SAMPLE, build_shard_index

SET_KIND = "webdataset-set"


class Member(NamedTuple):
    ext: str
    offset: int
    size: int
    """Of the member's data in the tar."""


class ShardSample(NamedTuple):
    shard: int
    key: str
    caption: Member | None
    image: Member | None


def _stamps(shards: Sequence[Path]) -> np.ndarray:
    """int64[S, 2]: each shard's size and mtime (ns), -1 where it cannot be read."""
    out = np.full((len(shards), 2), -1, dtype=np.int64)
    for si, shard in enumerate(shards):
        try:
            st = os.stat(shard)
        except OSError:
            continue
        out[si] = st.st_size, st.st_mtime_ns
    return out


class ShardSetIndex:
    """The samples of ``shards`` in order: ``sample(i)`` says where sample i's key, caption and image lie."""

    def __init__(self, shards: Sequence[Path], image_exts: Sequence[str], caption_exts: Sequence[str]) -> None:
        self.shards = list(shards)
        self.spec = {"image_exts": list(image_exts), "caption_exts": list(caption_exts)}
        names = "\0".join(os.path.abspath(s) for s in self.shards).encode("utf-8", "surrogateescape")
        self._beside = self.shards[0].parent / f".shards-{hashlib.sha1(names).hexdigest()[:16]}{SUFFIX}"
        stamps = _stamps(self.shards)
        self._stored = index_file.find_stored(self._beside, partial(self._describes, stamps=stamps)) or self._build()
        self._arrays: dict[str, np.ndarray] | None = None
        self.starts: list[int] = self.arrays["starts"].tolist()  # a list: bisect is the quickest search per read
        self.errors: list[tuple[int, str]] = [(si, error) for si, error in self._stored.header["errors"]]
        """(shard position, error) of the shards that could not be read to the end, in shard order."""

    def _describes(self, stored: StoredIndex, stamps: np.ndarray) -> bool:
        """Whether ``stored`` is the set index of these shards, as they are now."""
        h = stored.header
        if (h.get("kind"), h.get("version"), h.get("spec"), h.get("shards")) != (
                SET_KIND, VERSION, self.spec, len(self.shards)) or (stamps < 0).any():
            return False
        a = stored.arrays()
        return np.array_equal(a["shard_size"], stamps[:, 0]) and np.array_equal(a["shard_mtime_ns"], stamps[:, 1])

    def _shard_indexes(self) -> list[StoredIndex]:
        """Each shard's stored index, the missing ones built."""
        found = [index_file.find_index(s, KIND, self.spec) for s in self.shards]
        missing = [si for si, stored in enumerate(found) if stored is None]
        # Ranks starting together on unindexed shards build them in different orders, each checking again for an
        # index another rank has just written, so that they share the work instead of all doing all of it.
        random.Random(os.getpid()).shuffle(missing)
        build = partial(build_shard_index, spec=self.spec)
        for si in tqdm(missing, desc="indexing WebDataset shards", leave=False, disable=None):
            found[si] = index_file.load_or_build(self.shards[si], KIND, self.spec, build)
        return found

    def _build(self) -> StoredIndex:
        parts = self._shard_indexes()
        starts = np.cumsum([0] + [p.header["count"] for p in parts], dtype=np.int64)
        key_starts = np.cumsum([0] + [p.header["key_bytes"] for p in parts], dtype=np.int64)
        n, n_shards = int(starts[-1]), len(parts)
        header = {"kind": SET_KIND, "version": VERSION, "spec": self.spec, "shards": n_shards, "count": n,
                  "errors": [[si, p.header["error"]] for si, p in enumerate(parts) if p.header["error"] is not None]}
        shapes = {"shard_size": ("<i8", n_shards), "shard_mtime_ns": ("<i8", n_shards),
                  "starts": ("<i8", n_shards + 1), "samples": (SAMPLE, n), "keys": ("|u1", key_starts[-1])}

        def fill(put: Put) -> None:
            put("shard_size", 0, np.array([p.header.get("source_size", -1) for p in parts], dtype=np.int64))
            put("shard_mtime_ns", 0, np.array([p.header.get("source_mtime_ns", -1) for p in parts], dtype=np.int64))
            put("starts", 0, starts)
            for si, part in enumerate(parts):
                a = part.arrays()
                samples = np.array(a["samples"])
                samples["key_offset"] += key_starts[si]
                put("samples", starts[si], samples)
                put("keys", key_starts[si], a["keys"])

        keep = all(p.path is not None for p in parts)  # a shard not stored (unreadable for now) is read again
        return index_file.store_index(self._beside, header, shapes, fill, keep)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The set index's arrays (np.memmap views of its file, or resident arrays where it could not be stored)."""
        if self._arrays is None:
            self._arrays = self._stored.arrays()
            self._keys = memoryview(self._arrays["keys"])
        return self._arrays

    def __len__(self) -> int:
        return self.starts[-1]

    def sample(self, i: int) -> ShardSample:
        """Sample ``i`` (0 <= i < len)."""
        # .item() and the memoryview read without np.memmap's Python-level __getitem__ (slow per call)
        key_offset, key_size, caption_ext, image_ext, *where = self.arrays["samples"].item(i)
        key = bytes(self._keys[key_offset : key_offset + key_size]).decode("utf-8", "surrogateescape")
        caption = None if caption_ext == NONE else Member(self.spec["caption_exts"][caption_ext], *where[:2])
        image = None if image_ext == NONE else Member(self.spec["image_exts"][image_ext], *where[2:])
        return ShardSample(bisect.bisect_right(self.starts, i) - 1, key, caption, image)

    def __getstate__(self) -> dict:
        # a pickled copy (a spawned data-loader worker) maps the file again
        return {k: v for k, v in self.__dict__.items() if k != "_keys"} | {"_arrays": None}
