"""Stored WebDataset shard indexes (issue 22): each shard is indexed once, beside it or in the cache folder,
reused while the shard is unchanged, safe under concurrent builders, and read exactly as the reader that scanned
every tar header at start-up (tests/legacy_webdataset.py): the same records, in the same order, with the same
counts of bad reasons."""

import io
import multiprocessing
import os
import pickle
import re
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from janusflow.data import index_file
from janusflow.data import shapes as S
from janusflow.data.sources import WebDatasetSource
from tests.legacy_webdataset import LegacyWebDatasetSource

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> Path:
    root = S.write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 30, 5, 32, 2, seed=1, shard_size=10)
    return root


@pytest.fixture
def shards(tmp_path, shapes_shards) -> Path:
    """A fresh copy of the three shapes shards (no index yet)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in sorted(shapes_shards.glob("gen_train-*.tar")):
        shutil.copy2(s, folder / s.name)
    return folder


@pytest.fixture
def scans(monkeypatch) -> list:
    """The shards ``tarfile.open`` is called on, from now on."""
    opened, real_open = [], tarfile.open

    def counting_open(name, *args, **kwargs):
        opened.append(Path(name).name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    return opened


def pattern(folder: Path) -> str:
    return str(folder / "gen_train-{00000..00002}.tar")


def errors(ds) -> dict[str, str]:
    """The latest error message per reason, without the addresses PIL puts in some."""
    return {k: re.sub(r" at 0x[0-9a-f]+", "", v) for k, v in ds.last_error.items()}


def first_of(exts: dict, preference) -> tuple | None:
    ext = next((e for e in preference if e in exts), None)
    return None if ext is None else (ext, *exts[ext])


def assert_same_index(new, old) -> None:
    """Each sample's shard, key, and chosen caption and image members (ext, offset, size) as the old reader's."""
    spec = new.index.spec
    got = [new.index.sample(i) for i in range(len(new))]
    assert [(s.shard, s.key) for s in got] == [(si, key) for si, key, _ in old.samples]
    for s, (_, _, exts) in zip(got, old.samples):
        for member, preference in ((s.caption, spec["caption_exts"]), (s.image, spec["image_exts"])):
            assert (member and (member.ext, member.offset, member.size)) == first_of(exts, preference)


def assert_same_reads(new, old) -> None:
    """Record by record (whole and caption-only), then the stats and error messages, as the old reader."""
    assert new.stats == old.stats and errors(new) == errors(old)  # bad_shard is counted at start-up
    assert_same_index(new, old)
    for i in range(len(old)):
        a, b = new[i], old[i]
        assert (a is None) == (b is None), i
        if a is not None:
            assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        c, d = new.caption_record(i), old.caption_record(i)
        assert (c is None) == (d is None) and (c is None or c.caption == d.caption)
    assert new.stats == old.stats and errors(new) == errors(old) and new.last_reason == old.last_reason


def index_files(folder: Path) -> list[str]:
    """The index files (and any tmp file) in ``folder``, the set index's name shortened to ``.shards-*``."""
    return sorted(re.sub(r"^\.shards-[0-9a-f]{16}", ".shards-*", p.name) for p in folder.iterdir() if ".idx" in p.name)


PER_SHARD = [f"gen_train-0000{k}.tar.idx" for k in range(3)]


def test_the_shapes_shards_read_as_before(shards, scans):
    cold = WebDatasetSource(pattern(shards))
    assert sorted(scans) == ["gen_train-00000.tar", "gen_train-00001.tar", "gen_train-00002.tar"]
    assert_same_reads(cold, LegacyWebDatasetSource(pattern(shards)))
    assert cold.stats == {"ok": 60}
    assert_same_reads(WebDatasetSource(pattern(shards)), LegacyWebDatasetSource(pattern(shards)))


def test_an_index_is_built_once_then_reused(shards, scans):
    first = WebDatasetSource(pattern(shards))
    assert len(scans) == 3 and index_files(shards) == [".shards-*.idx", *PER_SHARD]
    second = WebDatasetSource(pattern(shards))
    assert len(scans) == 3  # no tar was opened again
    assert [second.caption(i) for i in range(30)] == [first.caption(i) for i in range(30)]
    arrays = second.index.arrays
    keys = [second.index.sample(i).key.encode() for i in range(30)]
    set_file = next(shards.glob(".shards-*.idx"))
    assert all(isinstance(a, np.memmap) and Path(a.filename) == set_file for a in arrays.values())
    assert arrays["starts"].tolist() == [0, 10, 20, 30] and len(arrays["samples"]) == 30
    assert arrays["samples"]["key_offset"].tolist() == np.cumsum([0] + [len(k) for k in keys[:-1]]).tolist()
    assert [(np.diff(arrays["samples"]["image_offset"][k : k + 10]) > 0).all() for k in (0, 10, 20)] == [True] * 3
    pickled = pickle.dumps(second)  # as for a spawned data-loader worker: the arrays are mapped again, not copied
    assert len(pickled) < 4096 and pickle.loads(pickled).caption(17) == first.caption(17)
    # another list of the same shards reuses the shard indexes; a glob that also matches them ignores them
    assert len(WebDatasetSource(str(shards / "gen_train-*"))) == 30
    assert len(WebDatasetSource([shards / PER_SHARD[2][:-4], shards / PER_SHARD[0][:-4]])) == 20
    assert len(scans) == 3 and index_files(shards) == [".shards-*.idx"] * 2 + PER_SHARD


def rewrite_with_fewer_samples(shard: Path, members: int) -> None:
    with tarfile.open(shard) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:members]]
    with tarfile.open(shard, "w") as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data))


def test_a_changed_shard_is_indexed_again(shards, scans):
    WebDatasetSource(pattern(shards))
    shard = shards / "gen_train-00001.tar"
    rewrite_with_fewer_samples(shard, 8)  # 4 of its 10 samples
    del scans[:]
    changed = WebDatasetSource(pattern(shards))
    assert scans == ["gen_train-00001.tar"] and len(changed) == 24
    st_ = shard.stat()
    os.utime(shard, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # same bytes, a newer mtime
    touched = WebDatasetSource(pattern(shards))
    assert len(touched) == 24 and scans == ["gen_train-00001.tar"] * 2
    assert index_files(shards) == [".shards-*.idx", *PER_SHARD]
    assert_same_reads(changed, LegacyWebDatasetSource(pattern(shards)))


def test_a_read_only_shard_folder_keeps_its_index_in_the_cache(shards, scans, tmp_path, monkeypatch):
    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "cache"))
    real_replace = os.replace

    def replace(src, dst):  # root ignores the folder's mode: refuse as the file system would for a user
        if Path(dst).parent == shards:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    shards.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        first = WebDatasetSource(pattern(shards))
        second = WebDatasetSource(pattern(shards))
    finally:
        shards.chmod(0o755)
    assert index_files(shards) == []  # not even a tmp file left behind
    cache = tmp_path / "cache" / "shard-index"
    cached = sorted(re.sub("^[0-9a-f]{16}-", "", name) for name in os.listdir(cache))
    assert [re.sub("^shards-[0-9a-f]{16}", "shards-*", name) for name in cached] == [*PER_SHARD, "shards-*.idx"]
    assert len(scans) == 3 and len(second) == 30
    assert Path(second.index.arrays["keys"].filename).parent == cache
    assert_same_reads(first, LegacyWebDatasetSource(pattern(shards)))


def test_with_nowhere_to_write_the_index_stays_in_memory(shards, scans, monkeypatch):
    monkeypatch.setattr(index_file, "_write_file", lambda *a: False)
    ds = WebDatasetSource(pattern(shards))
    assert index_files(shards) == [] and len(scans) == 3
    assert not any(isinstance(a, np.memmap) for a in ds.index.arrays.values())
    WebDatasetSource(pattern(shards))
    assert len(scans) == 6  # nothing was stored: built again
    assert_same_reads(ds, LegacyWebDatasetSource(pattern(shards)))


def test_a_shard_unreadable_for_now_is_counted_but_not_stored(shards, scans, monkeypatch):
    real_open = tarfile.open

    def failing(name, *a, **k):
        if Path(name).name == "gen_train-00002.tar":
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *a, **k)

    monkeypatch.setattr(tarfile, "open", failing)
    ds = WebDatasetSource(pattern(shards))
    assert len(ds) == 20 and ds.stats == {"bad_shard": 1} and "PermissionError" in ds.last_error["bad_shard"]
    assert index_files(shards) == PER_SHARD[:2]  # neither the failed shard's index nor the set's
    monkeypatch.setattr(tarfile, "open", real_open)
    again = WebDatasetSource(pattern(shards))
    assert len(again) == 30 and again.stats == {} and index_files(shards) == [".shards-*.idx", *PER_SHARD]


def _build_in_child(shard_pattern: str, barrier, results) -> None:
    # every child builds and writes every index, so that the writes of the same files race
    index_file.find_stored = lambda *a: None
    barrier.wait()
    ds = WebDatasetSource(shard_pattern)
    results.put([ds.caption(i) for i in range(len(ds))])


def test_concurrent_builders_leave_one_valid_index_per_file(shards, scans):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    children = [ctx.Process(target=_build_in_child, args=(pattern(shards), barrier, results)) for _ in range(3)]
    for c in children:
        c.start()
    captions = [results.get(timeout=60) for _ in children]
    for c in children:
        c.join(timeout=60)
        assert c.exitcode == 0
    assert captions[0] == captions[1] == captions[2] and len(captions[0]) == 30
    assert index_files(shards) == [".shards-*.idx", *PER_SHARD]  # and no tmp file
    reopened = WebDatasetSource(pattern(shards))
    assert scans == []  # the parent found every index valid
    assert_same_reads(reopened, LegacyWebDatasetSource(pattern(shards)))


# ----------------------------------------------------------------------------- garbled shards


def png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    S.render(S.Scene([S.ShapeObject("square", "blue", 0.5, 0.5, 0.5)]), size).save(buf, format="PNG")
    return buf.getvalue()


PNG = png()
NAMES = st.sampled_from(["a.png", "a.txt", "a.json", "b.jpg", "b.caption", "c.txt", "d.png", "noext", "dir/e.png",
                         "dir/e.txt", ".hidden", "f.PNG", "f.TXT", "g.tar.gz", "é.png", "é.txt", "h.text", "h.webp"])
DATA = st.one_of(st.just(PNG), st.just(PNG[:40]), st.binary(max_size=40), st.text(max_size=20).map(str.encode),
                 st.sampled_from([b'{"caption": " json caption "}', b'{"text": "t"}', b"[1]", b"{nope", b""]))


@FAST
@given(st.lists(st.tuples(NAMES, DATA), max_size=10), st.none() | st.floats(0.0, 1.0), st.booleans())
def test_garbled_shards_read_as_before(members, cut, directory):
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "s.tar"
        with tarfile.open(shard, "w") as tar:
            if directory:
                info = tarfile.TarInfo("adir")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        whole = Path(tmp) / "whole.tar"
        whole.write_bytes(shard.read_bytes())
        if cut is not None:
            shard.write_bytes(shard.read_bytes()[: int(cut * shard.stat().st_size)])
        for shards in ([shard], [shard, whole, shard]):  # the samples of several shards, keys concatenated
            for _ in ("cold", "warm"):
                assert_same_reads(WebDatasetSource(shards), LegacyWebDatasetSource(shards))
        assert index_files(Path(tmp)) == [".shards-*.idx", ".shards-*.idx", "s.tar.idx", "whole.tar.idx"]
