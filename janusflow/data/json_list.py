"""JsonList: the elements of a file holding one JSON list (LLaVA's conversation files), parsed one at a time.

The first open scans the file once with ``json``'s own decoder, element by element over a window of a few
``CHUNK``s (memory stays small), and stores each element's byte span in an index file (``index_file``, kind
``json-list``: ``spans``, n rows of int64 ``start`` and ``end``); later opens read that file's header only. Element i is
parsed from its bytes when read, which gives ``json.loads(whole file)[i]``. A file that is not valid JSON raises
ValueError and one that is not a list NotAListError, as loading it whole would. Files in UTF-16/32 (which
``json.loads`` also reads) are loaded whole and held in memory.

    entries = JsonList(Path("llava_v1_5_mix665k.json"))
    len(entries), entries[17]          # a dict parsed from its own bytes
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from janusflow.data.index_file import Built, load_or_build

KIND = "json-list"
CHUNK = 1 << 24
"""Bytes read at a time while scanning."""
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_NUMBER_CHARS = frozenset("0123456789+-.eE")
SPAN = np.dtype([("start", "<i8"), ("end", "<i8")])


class NotAListError(ValueError):
    """Valid JSON whose top level is not a list."""


class NotUtf8Error(ValueError):
    """JSON in UTF-16 or UTF-32: the scan does not map its characters to bytes."""


class _Window:
    """The decoded text of a file read ``CHUNK`` bytes at a time, mapping character positions to byte offsets."""

    def __init__(self, f: BinaryIO, first_byte: int) -> None:
        self.f, self.eof, self.text = f, False, ""
        # surrogatepass: what json.loads(bytes) decodes with
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogatepass")
        self.mark, self.mark_byte = 0, first_byte
        """A character position of ``text`` and its byte offset in the file."""

    def more(self) -> None:
        chunk = self.f.read(CHUNK)
        self.eof = not chunk
        self.text += self.decoder.decode(chunk, final=self.eof)

    def byte(self, pos: int) -> int:
        """The byte offset of character ``pos`` (not before the previous call's)."""
        piece = self.text[self.mark : pos]
        self.mark_byte += len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogatepass"))
        self.mark = pos
        return self.mark_byte

    def char(self, pos: int) -> str:
        return self.text[pos : pos + 1]

    def skip_space(self, pos: int) -> int:
        while True:
            pos = _WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text) or self.eof:
                return pos
            self.more()

    def value_end(self, pos: int) -> int:
        """The end of the JSON value starting at ``pos``, reading on until the value is whole."""
        while True:
            try:
                end = _DECODER.raw_decode(self.text, pos)[1]
                # a number cut by the window's end ("1" of "12", "0" of "0.5") parses: it is whole only before
                # a character that cannot go on a number (valid JSON has "," "]" or whitespace there)
                if self.eof or (end < len(self.text) and self.text[end] not in _NUMBER_CHARS):
                    return end
            except json.JSONDecodeError:
                if self.eof:
                    raise
            self.more()

    def drop_before(self, pos: int) -> int:
        """Forget the text before ``pos``; ``pos``'s new position (0)."""
        self.byte(pos)
        self.text, self.mark = self.text[pos:], 0
        return 0


def _utf8_window(f: BinaryIO) -> _Window:
    """A window on ``f`` after its byte-order mark, if any; NotUtf8Error for JSON in UTF-16 or UTF-32."""
    encoding = json.detect_encoding(f.read(4))
    if encoding not in ("utf-8", "utf-8-sig"):
        raise NotUtf8Error(encoding)
    bom = len(codecs.BOM_UTF8) if encoding == "utf-8-sig" else 0
    f.seek(bom)
    return _Window(f, bom)


def scan_spans(path: Path) -> np.ndarray:
    """SPAN[n]: the byte spans [start, end) of the elements of the JSON list in ``path``; ValueError if the file
    is not valid JSON, NotAListError / NotUtf8Error when it does not start with "[" / is not UTF-8."""
    starts, ends = array("q"), array("q")
    with open(path, "rb") as f:
        w = _utf8_window(f)
        pos = w.skip_space(0)
        if w.char(pos) != "[":
            raise NotAListError(f"starts with {w.char(pos)!r}")
        pos = w.skip_space(pos + 1)
        while w.char(pos) != "]" or starts:
            end = w.value_end(pos)
            starts.append(w.byte(pos))
            ends.append(w.byte(end))
            pos = w.skip_space(end)
            if w.char(pos) == "]":
                break
            if w.char(pos) != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", w.text, pos)
            pos = w.skip_space(pos + 1)
            if pos > CHUNK:
                pos = w.drop_before(pos)
        pos = w.skip_space(pos + 1)
        if pos < len(w.text):
            raise json.JSONDecodeError("Extra data", w.text, pos)
    spans = np.zeros(len(starts), dtype=SPAN)
    spans["start"], spans["end"] = starts, ends
    return spans


def _build(path: Path) -> Built:
    spans = scan_spans(path)
    return Built({"count": len(spans)}, {"spans": spans})


def _whole(path: Path) -> list:
    value = json.loads(path.read_bytes())
    if not isinstance(value, list):
        raise NotAListError(f"expected a JSON list of records, got {type(value).__name__}")
    return value


class JsonList(Sequence):
    """The elements of the JSON list in ``path``, each parsed from its stored byte span when read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._resident: list | None = None
        self._spans: np.ndarray | None = None
        try:
            self._stored = load_or_build(self.path, KIND, None, _build)
        except (NotAListError, NotUtf8Error):
            self._stored, self._resident = None, _whole(self.path)
            return
        self._count = self._stored.header["count"]

    def __len__(self) -> int:
        return len(self._resident) if self._resident is not None else self._count

    def spans(self) -> np.ndarray:
        """SPAN[n], each element's byte span (memory-mapped)."""
        if self._spans is None:
            self._spans = self._stored.arrays()["spans"]
        return self._spans

    def __getitem__(self, i: int) -> Any:
        if self._resident is not None:
            return self._resident[i]
        start, end = self.spans().item(i)  # one row, without np.memmap's slow Python-level __getitem__
        with open(self.path, "rb") as f:
            f.seek(start)
            return json.loads(f.read(end - start))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_spans": None}  # a pickled copy maps the index file again
