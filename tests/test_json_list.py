"""JsonList (issue 22): a JSON list file read one element at a time through a stored byte-span index gives
exactly ``json.loads(whole file)``, fails where it fails, and is indexed once."""

import codecs
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from janusflow.data import json_list
from janusflow.data.json_list import JsonList, NotAListError
from janusflow.data.sources import LlavaJsonSource

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FORMATS = st.fixed_dictionaries({"indent": st.sampled_from([None, 0, 2]), "ensure_ascii": st.booleans(),
                                 "separators": st.sampled_from([None, (",", ":"), (" , ", " : ")])})


def read_as_old(path: Path):
    """What loading the whole file gives: the list, or the exception type."""
    try:
        value = json.loads(path.read_bytes())
    except ValueError:
        return ValueError
    return value if isinstance(value, list) else NotAListError


def read_as_new(path: Path, chunk: int):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json_list, "CHUNK", chunk)
        try:
            entries = JsonList(path)
        except NotAListError:
            return NotAListError
        except ValueError:
            return ValueError
        return [entries[i] for i in range(len(entries))]


@FAST
@given(st.lists(VALUES, max_size=6), FORMATS, st.sampled_from(["", " \n", "\t"]), st.booleans(),
       st.integers(1, 40))
def test_elements_are_those_of_the_whole_file(values, fmt, space, bom, chunk):
    text = space + json.dumps(values, **fmt) + space
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.json"
        path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode())
        assert read_as_new(path, chunk) == values  # the window of `chunk` bytes splits values anywhere
        assert read_as_new(path, chunk) == values  # from the stored index
        assert (Path(tmp) / "list.json.idx").exists()


EDITS = st.sampled_from(["cut", "insert", "delete"])
JUNK = st.sampled_from([b",", b"]", b"[", b"{", b"}", b'"', b" ", b"1", b"x", b"\\", b"\xff", b"\xc3", b":"])


@FAST
@given(st.lists(VALUES, max_size=5), EDITS, st.floats(0.0, 1.0), JUNK, st.integers(1, 16))
def test_damaged_files_fail_or_read_as_the_whole_file(values, edit, where, junk, chunk):
    data = json.dumps(values, ensure_ascii=False).encode()
    k = int(where * len(data))
    data = {"cut": data[:k], "insert": data[:k] + junk + data[k:], "delete": data[:k] + data[k + 1 :]}[edit]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.json"
        path.write_bytes(data)
        assert read_as_new(path, chunk) == read_as_old(path)


def test_the_index_is_built_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    scans, real_scan = [], json_list.scan_spans
    monkeypatch.setattr(json_list, "scan_spans", lambda p: scans.append(p) or real_scan(p))
    path = tmp_path / "und.json"
    records = [{"id": i, "conversations": [{"from": "gpt", "value": "é" * i}]} for i in range(5)]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    first = JsonList(path)
    assert len(scans) == 1 and list(first) == records
    second = JsonList(path)
    assert len(scans) == 1 and list(second) == records
    spans = second.spans()
    assert isinstance(spans, np.memmap) and Path(spans.filename) == tmp_path / "und.json.idx"
    raw = path.read_bytes()
    assert [json.loads(raw[s:e]) for s, e in zip(spans["start"], spans["end"])] == records
    path.write_text(json.dumps(records[:3]))
    assert list(JsonList(path)) == records[:3] and len(scans) == 2


def test_utf16_files_and_odd_top_levels_read_as_before(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "ü"}, {"from": "gpt", "value": "x"}]}]
    (tmp_path / "u16.json").write_bytes(json.dumps(records).encode("utf-16"))
    assert list(JsonList(tmp_path / "u16.json")) == records and not (tmp_path / "u16.json.idx").exists()
    (tmp_path / "dict.json").write_text('{"records": []}')
    with pytest.raises(ValueError, match=r"dict.json: expected a JSON list of records, got dict"):
        LlavaJsonSource(tmp_path / "dict.json")
    for bad in ("", "[", "[1,]", "[1] 2", '[{"a": 1}'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="bad.json: not valid JSON"):
            LlavaJsonSource(tmp_path / "bad.json")
    assert not any(p.name.endswith(".idx") for p in tmp_path.iterdir())  # only lists are indexed
