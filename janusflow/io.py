"""Files and folders written whole or not at all, and the JSONL reader.

Every artefact janusflow writes (prep caches, latent caches, checkpoints' ``latest``, stage weights, the export,
the shapes world) goes through ``atomic_path``: the content is written under a temporary sibling name and
renamed into place in one step, so a kill at any point leaves the old target (or none), never half of one.

    with atomic_path(run_dir / "export") as tmp:      # tmp: a fresh path next to the target
        model.save_pretrained(tmp)                      # a folder (or a file) written at leisure
    build_once(cache / "codec-1a2b", train_codec)       # skipped when the target exists
    rows = read_jsonl(path)                             # parsed lines; broken ones kept as BrokenLine
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of ``target`` left by writers on this host that were killed (their process is gone)."""
    host = socket.gethostname()
    for p in target.parent.glob(f".{target.name}.*-*-*-*"):
        kind, pid, _, owner = p.name[len(target.name) + 2:].split("-", 3)  # hosts may contain '-'
        if kind in ("tmp", "old") and pid.isdigit() and owner == host and not _pid_alive(int(pid)):
            _remove(p)


@contextlib.contextmanager
def atomic_path(target: str | Path, done: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write (a file or a folder); when the block ends without an
    error it replaces ``target`` in one rename (an existing folder is moved aside first, then deleted).

    ``done()``: checked before the rename; True means a concurrent writer already published an equivalent
    target, which is then kept (the temporary is discarded). An error removes the temporary and re-raises.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    try:
        yield tmp
        if done is not None and done():
            return
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old-{tag}")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_dir_atomic(target: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp_dir)`` into a fresh folder, then publish it as ``target`` (replacing an old one)."""
    with atomic_path(target) as tmp:
        tmp.mkdir()
        write(tmp)
    return Path(target)


def build_once(target: str | Path, build: Callable[[Path], Any]) -> Path:
    """Run ``build(tmp_dir)`` unless ``target`` exists; publish the result atomically."""
    target = Path(target)
    if not target.exists():
        write_dir_atomic(target, build)
    return target


@dataclass(frozen=True)
class BrokenLine:
    """A JSONL line that does not parse (bad JSON or UTF-8), kept so that a reader can count it."""

    detail: str


def read_jsonl(path: str | Path) -> list[Any]:
    """The parsed lines of a JSONL file; blank lines skipped, broken ones (a line cut short by a kill, bad JSON or
    UTF-8) kept as ``BrokenLine`` in their place."""
    rows: list[Any] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                rows.append(BrokenLine(f"{path}:{number}: {e}"))
    return rows


def read_jsonl_records(path: str | Path) -> list[Any]:
    """The parseable lines of a JSONL file (none when it does not exist): for our own logs and manifests."""
    path = Path(path)
    return [r for r in read_jsonl(path) if not isinstance(r, BrokenLine)] if path.exists() else []
