"""Start-up cost of the data readers at web scale: stored shard / JSON indexes vs the readers that scanned everything.

Writes synthetic WebDataset shards in img2dataset's layout (``KEY.jpg`` 8x8 + ``KEY.txt`` + ``KEY.json``,
``--shard-size`` samples per shard) for each of ``--sizes``, and a synthetic LLaVA-Instruct-sized conversation
JSON (``--llava`` records, 1-2 exchanges of 300-600 characters). Every measurement runs in fresh processes, as
ranks do; each process prints the seconds to open the source, its RSS increase from opening it, random reads
per second (full records: caption + decoded image; for the JSON, record parses) and its RSS increase after them
(in brackets the private part, RSS less the file pages it maps: the index pages a read touched stay in RSS but
are the page cache, shared by every process on the machine and dropped under memory pressure):

    cold, 1 process      no index yet: one process builds every shard's index
    cold, R ranks        no index yet: --ranks processes open at once and share the building
    warm, R ranks        the indexes exist: --ranks processes open at once
    old, R ranks         the reader before the index (tests/legacy_webdataset.py), at --old-sizes only

then the ratios old / warm of the same run. The data are generated into ``--root`` (default: a temporary
folder, deleted unless ``--keep``); an existing dataset there is reused.

    python benchmarks/data_index.py                                  # 100k and 1M samples, LLaVA 665k
    python benchmarks/data_index.py --sizes 100000 --llava 0 --root /tmp/jfbench --keep
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("a the red blue green small large circle square triangle left right above below photo of picture "
         "with on in near two three shapes image what is how many colour object there").split()


def tiny_jpegs(n: int = 16) -> list[bytes]:
    from PIL import Image

    out = []
    for k in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (16 * k, 255 - 16 * k, 128)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n_samples: int, shard_size: int) -> str:
    """img2dataset-style shards ``folder/{00000..}.tar``; the brace pattern that names them."""
    n_shards = -(-n_samples // shard_size)
    pattern = str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")
    if (folder / "done").exists():
        return pattern
    folder.mkdir(parents=True, exist_ok=True)
    images, rng = tiny_jpegs(), random.Random(0)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * shard_size, min(n_samples, (s + 1) * shard_size)):
                key, caption = f"{i:09d}", words(rng, 5, 15)
                tar_add(tar, f"{key}.jpg", images[i % len(images)])
                tar_add(tar, f"{key}.txt", caption.encode())
                meta = {"key": key, "caption": caption, "url": f"https://example.com/{key}.jpg", "width": 8}
                tar_add(tar, f"{key}.json", json.dumps(meta).encode())
    (folder / "done").touch()
    return pattern


def write_llava(path: Path, n_records: int) -> None:
    if path.exists():
        return
    rng = random.Random(0)
    with open(path, "w") as f:
        f.write("[")
        for i in range(n_records):
            turns = []
            for t in range(rng.choice((1, 1, 2))):
                turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + words(rng, 6, 16) + "?"})
                turns.append({"from": "gpt", "value": words(rng, 20, 60) + "."})
            rec = {"id": f"{i:09d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": turns}
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")


def remove_indexes(folder: Path) -> None:
    for p in folder.glob("*.idx"):
        p.unlink()


# ----------------------------------------------------------------------------- one measuring process


def worker(kind: str, path: str, reads: int, seed: int) -> dict:
    """Open ``path`` with the reader ``kind`` in this fresh process; the numbers as a dict."""
    import psutil

    sys.path.insert(0, str(ROOT))
    from janusflow.data.json_list import JsonList
    from janusflow.data.sources import WebDatasetSource
    from tests.legacy_webdataset import LegacyWebDatasetSource, legacy_json_list

    open_reader = {"new": WebDatasetSource, "old": LegacyWebDatasetSource, "json-new": JsonList,
                   "json-old": legacy_json_list}[kind]
    proc = psutil.Process()
    mem0 = proc.memory_info()
    t0 = time.perf_counter()
    src = open_reader(path)
    opened = time.perf_counter() - t0
    rss_open = proc.memory_info().rss - mem0.rss
    rng = random.Random(seed)
    t0 = time.perf_counter()
    ok = sum(src[rng.randrange(len(src))] is not None for _ in range(reads))
    rate = reads / (time.perf_counter() - t0)
    assert ok == reads, f"{reads - ok} of {reads} reads failed"
    mem = proc.memory_info()
    return {"n": len(src), "open_s": opened, "rss_open_mb": rss_open / 2**20, "reads_per_s": rate,
            "rss_reads_mb": (mem.rss - mem0.rss) / 2**20,
            "private_reads_mb": ((mem.rss - mem.shared) - (mem0.rss - mem0.shared)) / 2**20}


def run_ranks(kind: str, path: str, ranks: int, reads: int) -> list[dict]:
    """``ranks`` fresh processes opening ``path`` at the same time; each one's numbers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", kind, "--path", path, "--reads", str(reads)]
    procs = [subprocess.Popen(cmd + ["--seed", str(r)], stdout=subprocess.PIPE, text=True, env=env)
             for r in range(ranks)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker {kind} failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------------------- report


def row(label: str, results: list[dict]) -> tuple[str, dict]:
    worst = {k: max(r[k] for r in results) for k in ("open_s", "rss_open_mb", "rss_reads_mb", "private_reads_mb")}
    worst["reads_per_s"] = min(r["reads_per_s"] for r in results)
    print(f"| {label} | {results[0]['n']:,} | {len(results)} | {worst['open_s']:.3f} | {worst['rss_open_mb']:.1f} "
          f"| {worst['reads_per_s']:,.0f} | {worst['rss_reads_mb']:.1f} ({worst['private_reads_mb']:.1f}) |",
          flush=True)
    return label, worst


def header(title: str, reads: str) -> None:
    print(f"\n{title}\n\n| reader | records | processes | open s (max) | RSS +MB after open (max) | {reads} (min) "
          "| RSS +MB after reads (private) (max) |\n|---|---|---|---|---|---|---|", flush=True)


def ratios(old: dict, warm: dict) -> None:
    open_x = old["open_s"] / warm["open_s"]
    rss_x = old["rss_open_mb"] / max(warm["rss_open_mb"], 0.01)  # RSS is counted in 4 KiB pages
    reads_x = warm["reads_per_s"] / old["reads_per_s"]
    print(f"\nold / warm: open time x{open_x:,.0f}, RSS after open x{rss_x:,.0f}; reads/s warm / old x{reads_x:.2f}",
          flush=True)


def bench_shards(root: Path, size: int, args) -> None:
    folder = root / f"shards-{size}"
    t0 = time.perf_counter()
    pattern = write_shards(folder, size, args.shard_size)
    print(f"\n{size:,} samples in {-(-size // args.shard_size)} shards x {args.shard_size} "
          f"({sum(p.stat().st_size for p in folder.glob('*.tar')) / 2**30:.2f} GiB; ready in "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    header(f"WebDataset, {size:,} samples", "full records/s")
    remove_indexes(folder)
    row("cold, 1 process", run_ranks("new", pattern, 1, args.reads))
    remove_indexes(folder)
    row(f"cold, {args.ranks} ranks at once", run_ranks("new", pattern, args.ranks, args.reads))
    _, warm = row(f"warm, {args.ranks} ranks at once", run_ranks("new", pattern, args.ranks, args.reads))
    if size in args.old_sizes:
        _, old = row(f"old, {args.ranks} ranks at once", run_ranks("old", pattern, args.ranks, args.reads))
        ratios(old, warm)


def bench_llava(root: Path, n: int, args) -> None:
    path = root / f"llava-{n}.json"
    t0 = time.perf_counter()
    write_llava(path, n)
    print(f"\nLLaVA JSON: {n:,} records, {path.stat().st_size / 2**20:.0f} MiB (ready in "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    header(f"LLaVA JSON, {n:,} records", "record parses/s")
    remove_indexes(root)
    row("cold (byte-span index), 1 process", run_ranks("json-new", str(path), 1, args.reads))
    _, warm = row(f"warm, {args.ranks} ranks at once", run_ranks("json-new", str(path), args.ranks, args.reads))
    _, old = row(f"old (json.loads), {args.ranks} ranks at once",
                 run_ranks("json-old", str(path), args.ranks, args.reads))
    ratios(old, warm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="WebDataset samples")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--old-sizes", type=int, nargs="*", default=[100_000], help="sizes to time the old reader at")
    p.add_argument("--llava", type=int, default=665_000, help="LLaVA JSON records (0: skip)")
    p.add_argument("--ranks", type=int, default=2, help="processes opening at once")
    p.add_argument("--reads", type=int, default=2000, help="random reads per process")
    p.add_argument("--root", type=Path, help="where the data go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.reads, args.seed)))
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="jf-data-index-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for size in args.sizes:
            bench_shards(root, size, args)
        if args.llava:
            bench_llava(root, args.llava, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
