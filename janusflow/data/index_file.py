"""Index files: numpy arrays describing data files, built once and memory-mapped by every reader.

An index has a preferred place beside its data (``data.tar`` -> ``data.tar.idx``); where that folder is not
writable it goes to the cache folder (``$JANUSFLOW_CACHE/shard-index``, default ``~/.cache/janusflow/shard-index``)
under a name hashed from the preferred path; where neither is writable it stays in memory. Whoever reads an index
checks that it still describes the data (for one data file: its size and mtime, recorded in the header, and the
kind, version and build parameters ``spec``) and rebuilds it otherwise. Writers publish with a hidden tmp file +
``os.replace``, so ranks building the same index at once leave one whole file (the last rename wins, with
identical contents), and a reader that mapped the previous file keeps reading it.

Layout: ``MAGIC`` (8 bytes), the header's length (uint32, little-endian), the header (JSON: the builder's fields,
``data_bytes``, and per array [dtype as numpy's descr, length, byte offset in the data section]; a structured dtype
stores one row per entry), zero padding, then the data section (the file's last ``data_bytes`` bytes, from a
multiple of ``ALIGN``), each array at a multiple of ``ALIGN``.
Checking an index reads its header only; the arrays are mapped when a reader needs them.

    stored = load_or_build(Path("shard-00000.tar"), "webdataset-shard", spec, build)
    stored.header["count"], stored.arrays()["image_offset"]      # an np.memmap view
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = ".idx"
MAGIC = b"JFINDEX\x01"
VERSION = 1
ALIGN = 64
_LENGTH = struct.Struct("<I")

Put = Callable[[str, int, np.ndarray], None]
"""``put(name, start, values)``: write ``values`` into array ``name`` from element ``start`` on."""


@dataclass
class Built:
    """What a one-file builder returns: JSON-able header fields and the arrays."""

    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    keep: bool = True
    """False for a result that must not be stored (e.g. the data file was unreadable just now)."""


@dataclass
class StoredIndex:
    header: dict[str, Any]
    path: Path | None
    """The index file; None when it was not stored (the arrays are then held in ``resident``)."""
    resident: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name: read-only ``np.memmap`` views of the index file (or the resident arrays)."""
        if self.resident is not None:
            return self.resident
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = len(raw) - self.header["data_bytes"]
        out = {}
        for name, (descr, length, offset) in self.header["arrays"].items():
            dtype = to_dtype(descr)
            out[name] = raw[start + offset : start + offset + length * dtype.itemsize].view(dtype)
        return out


def to_dtype(descr: Any) -> np.dtype:
    """The dtype of a descr as it reads back from JSON (a structured one's fields come back as lists)."""
    return np.dtype([tuple(f) for f in descr] if isinstance(descr, list) else descr)


def cache_dir() -> Path:
    root = os.environ.get("JANUSFLOW_CACHE")
    return Path(root) / "shard-index" if root else Path.home() / ".cache" / "janusflow" / "shard-index"


def index_locations(beside: Path) -> tuple[Path, Path]:
    """Where the index whose preferred place is ``beside`` may be: there, and in the cache folder."""
    digest = hashlib.sha1(os.path.abspath(beside).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return beside, cache_dir() / f"{digest}-{beside.name.lstrip('.')}"


def _header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _data_start(header_length: int) -> int:
    return -(-(len(MAGIC) + _LENGTH.size + header_length) // ALIGN) * ALIGN


def read_header(path: Path) -> dict[str, Any] | None:
    """The header of the index file at ``path``; None if absent, foreign, garbled or cut short."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _LENGTH.size)
            if len(head) < len(MAGIC) + _LENGTH.size or head[: len(MAGIC)] != MAGIC:
                return None
            (length,) = _LENGTH.unpack(head[len(MAGIC) :])
            header = json.loads(f.read(length))
            if os.fstat(f.fileno()).st_size != _data_start(length) + header["data_bytes"]:
                return None
            return header
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_stored(beside: Path, accept: Callable[[StoredIndex], bool]) -> StoredIndex | None:
    """The first stored index (at ``beside``, then in the cache) that ``accept`` takes, or None."""
    for path in index_locations(beside):
        header = read_header(path)
        if header is not None and accept(stored := StoredIndex(header, path)):
            return stored
    return None


def _layout(header: dict[str, Any], shapes: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """``header`` completed with each array's dtype, length and aligned offset, and the data section's size."""
    offset, arrays = 0, {}
    for name, (dtype, length) in shapes.items():
        arrays[name] = [np.lib.format.dtype_to_descr(np.dtype(dtype)), int(length), offset]
        offset += -(-int(length) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return {**header, "arrays": arrays, "data_bytes": offset}


def _write_file(path: Path, header: dict[str, Any], fill: Callable[[Put], None]) -> bool:
    """Publish an index file atomically; False (nothing left behind) where it cannot be written."""
    head = _header_bytes(header)
    start = _data_start(len(head))
    tmp = path.with_name(f".{path.name.lstrip('.')}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(MAGIC + _LENGTH.pack(len(head)) + head)
            f.truncate(start + header["data_bytes"])  # the padding and every array's room, zeros

            def put(name: str, first: int, values: np.ndarray) -> None:
                descr, _, offset = header["arrays"][name]
                dtype = to_dtype(descr)
                f.seek(start + offset + first * dtype.itemsize)
                f.write(np.ascontiguousarray(values, dtype=dtype).tobytes())

            fill(put)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False


def store_index(beside: Path, header: dict[str, Any], shapes: dict[str, tuple[str, int]],
                fill: Callable[[Put], None], keep: bool = True) -> StoredIndex:
    """Write arrays of ``shapes`` ({name: (dtype-like, length)}), filled by ``fill(put)`` (which may be called more than
    once), at ``beside``, else in the cache, else (or when not ``keep``) hold them in memory."""
    header = _layout(header, shapes)
    if keep:
        for path in index_locations(beside):
            if _write_file(path, header, fill):
                return StoredIndex(header, path)
    resident = {name: np.zeros(length, dtype) for name, (dtype, length) in shapes.items()}
    fill(lambda name, first, values: resident[name].__setitem__(slice(first, first + len(values)), values))
    return StoredIndex(header, None, resident)


# ----------------------------------------------------------------------------- the index of one data file


def beside(source: Path) -> Path:
    return source.with_name(source.name + SUFFIX)


def _stamp(source: Path) -> dict[str, int] | None:
    try:
        st = os.stat(source)
    except OSError:
        return None
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def find_index(source: Path, kind: str, spec: Any) -> StoredIndex | None:
    """A stored index of ``source`` that still describes it, or None."""
    stamp = _stamp(source)
    if stamp is None:
        return None
    want = {"kind": kind, "version": VERSION, "spec": json.loads(json.dumps(spec)), **stamp}
    return find_stored(beside(source), lambda s: all(s.header.get(k) == v for k, v in want.items()))


def build_index(source: Path, kind: str, spec: Any, build: Callable[[Path], Built]) -> StoredIndex:
    """Build ``source``'s index and store it (see ``store_index``)."""
    stamp = _stamp(source)  # taken first: a file changed during the build is indexed again next time
    built = build(source)
    header = {"kind": kind, "version": VERSION, "spec": spec, **(stamp or {}), **built.fields}
    shapes = {name: (a.dtype, len(a)) for name, a in built.arrays.items()}

    def fill(put: Put) -> None:
        for name, a in built.arrays.items():
            put(name, 0, a)

    return store_index(beside(source), header, shapes, fill, keep=built.keep and stamp is not None)


def load_or_build(source: Path, kind: str, spec: Any, build: Callable[[Path], Built]) -> StoredIndex:
    """``source``'s stored index, built first if there is no valid one."""
    return find_index(source, kind, spec) or build_index(source, kind, spec, build)
