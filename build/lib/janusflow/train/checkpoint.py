"""Atomic, resumable checkpoints of a DeepSpeed engine plus our own training state.

Layout under a stage directory:
    checkpoints/step-000100/        DeepSpeed's files (model, per-rank optimizer shards) + state.pt
    checkpoints/latest              the tag of the newest *complete* checkpoint
A checkpoint is written as ``step-N.tmp`` and renamed only once every rank has finished, and
``latest`` is replaced atomically afterwards, so a kill at any point leaves the previous
checkpoint as the one to resume from; a write that fails (e.g. a full disk) is removed and raises
an error saying so. ``state.pt`` holds the step, the EMA weights, RNG states and data-stream counters.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

TAG = re.compile(r"^step-(\d+)$")
BYTES_PER_PARAM = 20
"""One checkpoint's size per model parameter, fp32: the module weights (4), the EMA in state.pt (4), and the
ZeRO optimizer's master copy and two AdamW moments (12) -- an upper bound when parts of the model are frozen."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_dir_atomic(target: Path, write) -> Path:
    """``write(tmp_dir)`` then rename it to ``target``: a kill leaves the old target or none, never half of one."""
    tmp = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB ({int(n)} bytes)"


def check_disk_space(path: Path, num_params: int) -> None:
    """Raise OSError naming ``path``, the free and the needed bytes when its filesystem cannot hold one
    checkpoint of a model with ``num_params`` parameters (checked before training, not at the first save)."""
    needed = BYTES_PER_PARAM * num_params
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(f"not enough disk space in {path}: {_size(free)} free, one checkpoint of the "
                      f"{num_params / 1e6:.1f}M-parameter model needs about {_size(needed)}")


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> str | None:
        f = self.root / "latest"
        if not f.exists():
            return None
        tag = f.read_text().strip()
        return tag if (self.root / tag / "state.pt").exists() else None

    def clean_incomplete(self) -> None:
        """Remove leftovers of interrupted saves (rank 0, at start)."""
        if _rank() == 0 and self.root.exists():
            for d in self.root.glob("*.tmp"):
                shutil.rmtree(d, ignore_errors=True)
        _barrier()

    def save(self, engine, step: int, state: dict) -> str:
        tag = f"step-{step:06d}"
        tmp_tag = f"{tag}.tmp"
        if _rank() == 0:
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
            if _rank() == 0:
                torch.save(state, self.root / tmp_tag / "state.pt")
        except OSError as e:  # e.g. ENOSPC: drop the partial write; `latest` still names the previous one
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
            previous = self.latest()
            keep = f"{self.root / previous} stays the latest checkpoint" if previous else "there is no checkpoint yet"
            raise OSError(f"writing checkpoint {self.root / tag} failed ({e.strerror or e}); the partial write was "
                          f"removed and {keep}. Free disk space, then resume") from e
        _barrier()
        if _rank() == 0:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            os.replace(self.root / tmp_tag, self.root / tag)
            write_text_atomic(self.root / "latest", tag)
            self._prune(tag)
        _barrier()
        return tag

    def load(self, engine, tag: str, module_only: bool = False) -> dict:
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=not module_only,
                                         load_lr_scheduler_states=not module_only, load_module_only=module_only)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        return torch.load(self.root / tag / "state.pt", map_location="cpu", weights_only=False)

    def _prune(self, newest: str) -> None:
        tags = sorted(d.name for d in self.root.iterdir() if d.is_dir() and TAG.match(d.name))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != newest:
                shutil.rmtree(self.root / old, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
