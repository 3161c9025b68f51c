"""Processes and DeepSpeed: the process group, this rank, one barrier, rank-0-first builds, parameter gathers under
ZeRO-3, and the policy that turns a recipe into DeepSpeed's engine config.

One plain ``python tools/train.py`` is a world of one (no launcher needed); ``torchrun`` / ``deepspeed`` set the
usual variables. The accelerator (``DS_ACCELERATOR``) is decided here only: CUDA when torch sees a GPU, else CPU
(gloo collectives); a value the user set is kept.

    rank, world, device = init_distributed()
    prep = rank0_first(lambda: prepare(recipe))     # rank 0 builds, then the others read what it built
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from janusflow.config import StageConfig, TrainConfig

T = TypeVar("T")
GATHER_NUMEL = 100_000_000
"""Parameters gathered at once when a ZeRO-3 model is read whole (EMA update, state dict): 400 MB in fp32."""


def configure_accelerator() -> str:
    """DeepSpeed's accelerator: the user's ``DS_ACCELERATOR``, else cuda when torch sees a GPU, else cpu."""
    return os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed (also for one plain process); returns (rank, world, device)."""
    configure_accelerator()
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module; the name itself resolves to the torch package)
    # DeepSpeed calls torch.distributed's renamed collectives: one warning per rank and call site, nothing to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        # DeepSpeed's shared-memory allreduce is JIT-compiled (~2 min on 2 cores) for little gain: gloo instead.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    if on_cpu:
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    device = torch.device(get_accelerator().device_name(int(os.environ["LOCAL_RANK"])))
    torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def rank() -> int:
    """This process's rank (before the process group exists: the launcher's RANK, else 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank0_first(build: Callable[[], T]) -> T:
    """``build()`` on rank 0, a barrier, then on the other ranks: for "rank 0 builds a cached artefact, then
    everyone loads it" (the others find it built and only read it)."""
    if rank() == 0:
        result = build()
    barrier()
    if rank() != 0:
        result = build()
    return result


def gathered(params: list[nn.Parameter]):
    """ZeRO-3 partitions parameters: gather them for reading (a no-op context otherwise; collective)."""
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def gathered_groups(params: list[nn.Parameter], max_numel: int | None = None) -> Iterator[slice]:
    """Consecutive groups of ``params`` of at most ``max_numel`` elements (a larger tensor alone), each gathered
    while the caller uses its slice (collective under ZeRO-3): memory for one group, not the whole model."""
    start, size, max_numel = 0, 0, max_numel or GATHER_NUMEL
    for i, p in enumerate(params):
        n = getattr(p, "ds_numel", p.numel())
        if i > start and size + n > max_numel:
            with gathered(params[start:i]):
                yield slice(start, i)
            start, size = i, 0
        size += n
    if start < len(params):
        with gathered(params[start:]):
            yield slice(start, len(params))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict on the CPU of rank 0 (other ranks get {}), under ZeRO-3 gathered one tensor at a
    time (collective: call on every rank)."""
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        with gathered([tensor] if isinstance(tensor, nn.Parameter) else []):
            if rank() == 0:
                state[name] = tensor.detach().cpu().clone()
    return state


def release_engine(engine) -> None:
    """Free a finished stage's engine: its optimizer states and its model's weights (on disk by then).

    DeepSpeed keeps a ZeRO-3 engine reachable after ``destroy`` (its Init context and hook caches refer to the
    module), which kept one stage's optimizer states alive into the next: the tensors are dropped by hand.
    """
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()
    optimizer = engine.optimizer
    for opt in (optimizer, getattr(optimizer, "optimizer", None)):  # DeepSpeed's wrapper and the torch optimizer
        if opt is None:
            continue
        if isinstance(getattr(opt, "state", None), dict):
            opt.state.clear()
        for name, value in list(vars(opt).items()):
            if _holds_tensors(value):
                setattr(opt, name, None)
    for p in engine.module.parameters():
        p.grad = None
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if hasattr(p, "ds_tensor"):
            p.ds_tensor = None


def _holds_tensors(value, depth: int = 2) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth == 0:
        return False
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensors(v, depth - 1) for v in value)


def free_memory() -> None:
    """Collect unreferenced cycles (DeepSpeed's engines have them) and hand the freed memory back to the OS."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def num_parameters(params: list[nn.Parameter]) -> int:
    """Parameter count, also of ZeRO-3 partitioned parameters (whose local ``numel()`` is 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)


# ----------------------------------------------------------------------------- the DeepSpeed config policy


@dataclass
class EnginePolicy:
    """How the recipe runs on DeepSpeed's engine.

    ``zero_stage``: the recipe's, except for one fp32 rank without offloading, where ZeRO has nothing to partition
    and its gradient buckets and flat copies only cost time (engine step 25 -> 14 ms of a ~0.36 s CPU step, with
    the fused AdamW); DeepSpeed's plain engine (stage 0) does the same maths there. bf16 keeps the recipe's
    stage: DeepSpeed's bf16 stage-0 optimizer is another code path, untested here.
    ``clips_itself``: the trainer clips instead of DeepSpeed on the plain fp32 engine, which would compute the
    norm a second time to clip (bf16 stage 0 clips its own fp32 copies, so it keeps DeepSpeed's).
    """

    zero_stage: int
    clips_itself: bool
    user_config: dict

    @classmethod
    def of(cls, train: TrainConfig, world: int, dtype: torch.dtype) -> EnginePolicy:
        user = json.loads(Path(train.deepspeed_config).read_text()) if train.deepspeed_config else {}
        zero = user.get("zero_optimization", {})
        offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
        stage = train.zero_stage if world > 1 or offload or dtype != torch.float32 else 0
        return cls(stage, stage == 0 and dtype == torch.float32, user)

    def engine_config(self, stage: StageConfig, world: int, grad_clip: float, bf16: bool) -> dict:
        """DeepSpeed's config for one stage: the recipe's JSON under our batch, clipping, precision and ZeRO."""
        per_step = stage.micro_batch_size * world
        if stage.batch_size % per_step:
            raise ValueError(f"stage {stage.name}: batch_size {stage.batch_size} is not divisible by "
                             f"micro_batch_size {stage.micro_batch_size} x {world} ranks")
        cfg = copy.deepcopy(self.user_config)
        cfg.update({
            "train_batch_size": stage.batch_size,
            "train_micro_batch_size_per_gpu": stage.micro_batch_size,
            "gradient_accumulation_steps": stage.batch_size // per_step,
            "gradient_clipping": 0.0 if self.clips_itself else grad_clip,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
        })
        cfg.setdefault("zero_optimization", {})["stage"] = self.zero_stage
        return cfg


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory: the accelerator's allocations on a GPU, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def gather_floats(value: float) -> list[float]:
    """``value`` of every rank, in rank order (collective)."""
    if world_size() == 1:
        return [value]
    out = [0.0] * world_size()
    dist.all_gather_object(out, value)
    return out
