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

from janusflow.io import write_text_atomic
from janusflow.train.distributed import barrier, rank
from janusflow.train.logging import print0

TAG = re.compile(r"^step-(\d+)$")
BYTES_PER_PARAM = 20
"""One checkpoint's size per model parameter, fp32: the module weights (4), the EMA in state.pt (4), and the
ZeRO optimizer's master copy and two AdamW moments (12) -- an upper bound when parts of the model are frozen."""


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


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed as asked (e.g. it was written by another number of ranks)."""


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
        if rank() == 0 and self.root.exists():
            for d in self.root.glob("*.tmp"):
                shutil.rmtree(d, ignore_errors=True)
        barrier()

    def save(self, engine, step: int, state: dict) -> str:
        tag = f"step-{step:06d}"
        tmp_tag = f"{tag}.tmp"
        if rank() == 0:
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
            if rank() == 0:
                torch.save(state, self.root / tmp_tag / "state.pt")
        except OSError as e:  # e.g. ENOSPC: drop the partial write; `latest` still names the previous one
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
            previous = self.latest()
            keep = f"{self.root / previous} stays the latest checkpoint" if previous else "there is no checkpoint yet"
            raise OSError(f"writing checkpoint {self.root / tag} failed ({e.strerror or e}); the partial write was "
                          f"removed and {keep}. Free disk space, then resume") from e
        barrier()
        if rank() == 0:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            os.replace(self.root / tmp_tag, self.root / tag)
            write_text_atomic(self.root / "latest", tag)
            self._prune(tag)
        barrier()
        return tag

    def check_resumable(self, tag: str, ema_model, world: int, zero_stage: int, resume: str) -> bool:
        """True when only the weights can be resumed (another number of ranks or ZeRO stage, and ``resume`` is
        "weights"). A checkpoint of another model configuration fails here, naming the keys, before DeepSpeed
        loads it (``ema_model.load_checked_state_dict``)."""
        saved = torch.load(self.root / tag / "state.pt", map_location="cpu", weights_only=False)
        path = self.root / tag
        ema_model.load_checked_state_dict(saved["ema"], source=f"checkpoint {path}")
        was_world, was_zero = saved.get("world_size", world), saved.get("zero_stage", zero_stage)
        if (was_world == world and was_zero == zero_stage) or was_zero == zero_stage == 0:
            return False
        if resume == "weights":
            print0(f"resuming {path} (written by {was_world} ranks, ZeRO stage {was_zero}) on {world} (stage "
                  f"{zero_stage}): weights, EMA and data position continue, the optimizer state starts afresh")
            return True
        raise ResumeError(
            f"{path} was written by {was_world} ranks (ZeRO stage {was_zero}) and this run has {world} (stage "
            f"{zero_stage}): DeepSpeed's optimizer state only reloads on the same number of ranks and ZeRO stage. "
            f"Resume with {was_world} ranks, or pass --resume weights to continue from its weights, EMA and data "
            f"position with a fresh optimizer state.")

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
