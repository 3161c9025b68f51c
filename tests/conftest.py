"""Shared test setup: offline hubs, offline wandb, deterministic tiny models."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from janusflow.config import model_config  # noqa: E402
from janusflow.models.janusflow import JanusFlow  # noqa: E402

DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: without the rendezvous variables an in-process Trainer set.

    (A child that inherits MASTER_PORT would try to bind the port this process's process group holds.)
    """
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS}
    return {**env, **extra}


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (including zero-initialised GRN / beg_of_und_embed) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_model() -> JanusFlow:
    torch.manual_seed(0)
    return randomize(JanusFlow(model_config("tiny"))).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The prep artefacts of this test in its own folder (JANUSFLOW_CACHE)."""
    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "_cache"))
    return tmp_path / "_cache"
