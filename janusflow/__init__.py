"""janusflow: train, fine-tune and sample JanusFlow (unified understanding + rectified-flow generation).

    from janusflow import JanusFlow, Trainer, load_pipeline, load_recipe

    Trainer(load_recipe("2to8", ["stages.1.max_steps=500"])).run()       # train (runs/2to8/export)
    pipe = load_pipeline("runs/2to8/export")                             # sample and chat
    images = pipe.generate(["a red circle"], seed=0)
    model = JanusFlow.from_pretrained("runs/2to8/export")               # the model alone (official layout)

The names are imported on first use, so ``import janusflow`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "JanusFlow": "janusflow.models.janusflow",
    "load_pipeline": "janusflow.pipeline",
    "load_recipe": "janusflow.config",
    "Trainer": "janusflow.train.trainer",
}
__all__ = ["JanusFlow", "Trainer", "load_pipeline", "load_recipe"]

if TYPE_CHECKING:
    from janusflow.config import load_recipe
    from janusflow.models.janusflow import JanusFlow
    from janusflow.pipeline import load_pipeline
    from janusflow.train.trainer import Trainer


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'janusflow' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
