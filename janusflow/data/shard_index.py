"""The sample index of one WebDataset tar shard, stored beside it (``shard-00000.tar.idx``) by ``index_file``.

Written here, not taken from a library: webdataset's ``wids`` (0.2.x, dropped in 1.0) wants each shard's sample count up
front, pickles a Python list per shard and asserts on damaged shards; mosaicml-streaming reads only its own MDS format.

A shard's samples are its members ``[folder/]STEM.EXT`` grouped by ``[folder/]STEM``, in the order each key first
appears; EXT (everything after the stem's first dot) is lower-cased and a later member of the same key and EXT
replaces an earlier one; directories and names without a stem or an extension are skipped. Of a sample's members
the index keeps the caption (the first of ``spec["caption_exts"]`` present) and the image (the first of
``spec["image_exts"]``). A shard that cannot be read to its end keeps the samples before the damage and records the
error; one that could not be opened for a passing reason (an OSError) is not stored, so it is read again next time.

Arrays (kind ``webdataset-shard``; n samples; header fields ``count`` = n, ``key_bytes``, ``error``):
    samples  SAMPLE[n], one row per sample (a random read touches one row, not one page per field):
             key_offset, key_size            the key's bytes in ``keys``
             caption_ext, image_ext          position in spec's caption_exts / image_exts, NONE if absent
             caption_offset, caption_size, image_offset, image_size    the member's data in the tar
    keys     uint8[key_bytes], the keys in UTF-8 (surrogateescape), packed
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from janusflow.data.index_file import Built

KIND = "webdataset-shard"
NONE = 255
SAMPLE = np.dtype([("key_offset", "<i8"), ("key_size", "<i4"), ("caption_ext", "u1"), ("image_ext", "u1"),
                   ("caption_offset", "<i8"), ("caption_size", "<i8"), ("image_offset", "<i8"), ("image_size", "<i8")])

Members = dict[str, dict[str, tuple[int, int]]]


def scan_members(shard: Path) -> tuple[Members, str | None, bool]:
    """``{key: {ext: (data offset, size)}}`` of a shard read with ``tarfile``, the error that stopped the read
    (None if it read to the end), and whether that outcome may be stored (not after an OSError)."""
    members: Members = {}
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
    except (tarfile.TarError, EOFError) as e:
        return members, f"{type(e).__name__}: {e}", True
    except OSError as e:
        return members, f"{type(e).__name__}: {e}", False
    return members, None, True


def _pick(exts: dict[str, tuple[int, int]], preference: Sequence[str]) -> tuple[int, int, int]:
    """(position in ``preference`` of the first ext present, or NONE; its offset; its size)."""
    for code, ext in enumerate(preference):
        if ext in exts:
            return code, *exts[ext]
    return NONE, 0, 0


def shard_arrays(members: Members, spec: dict) -> dict[str, np.ndarray]:
    """The index arrays (see the module docstring) of one shard's grouped members."""
    keys = [k.encode("utf-8", "surrogateescape") for k in members]
    samples = np.zeros(len(keys), dtype=SAMPLE)
    samples["key_size"] = [len(k) for k in keys]
    samples["key_offset"][1:] = np.cumsum(samples["key_size"][:-1])
    for field in ("caption", "image"):
        picks = np.array([_pick(exts, spec[f"{field}_exts"]) for exts in members.values()], dtype=np.int64)
        picks = picks.reshape(len(keys), 3)
        samples[f"{field}_ext"], samples[f"{field}_offset"], samples[f"{field}_size"] = picks.T
    return {"samples": samples, "keys": np.frombuffer(b"".join(keys), dtype=np.uint8)}


def build_shard_index(shard: Path, spec: dict) -> Built:
    members, error, keep = scan_members(shard)
    arrays = shard_arrays(members, spec)
    return Built({"count": len(members), "key_bytes": len(arrays["keys"]), "error": error}, arrays, keep)
