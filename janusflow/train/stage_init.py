"""A stage's starting point, and the checks a run makes before any work.

A stage starts from the previous stage's final weights (and continues its EMA), from a model directory (an export
or the official JanusFlow-1.3B), or fresh: the recipe's model built from ``train.seed`` with the LLM and SigLIP
loaded from their paths (or the prep's pretrained ones). A start model must fit the recipe's data pipeline.
The REPA projector (training-only, never exported) travels beside the weights, in ``final/repa_projector.safetensors``;
a stage starts from the one beside its starting weights, or from a fresh one. Everything a stage draws at random
when it starts (a fresh projector) comes from ``stage_seed(train.seed, index)``, so a stage restarted in a new
process (a kill before its first checkpoint) begins exactly as it did in the uninterrupted run.

    model, ema_init = starting_model(recipe, index, stage_dir, prep)
    torch.manual_seed(stage_seed(recipe.train.seed, index))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from janusflow.config import Recipe, to_dict
from janusflow.data.mixture import hash_seed
from janusflow.models.janusflow import JanusFlow
from janusflow.train.checkpoint import check_disk_space

PROJECTOR_FILE = "repa_projector.safetensors"

START_KEYS = ("gen_image_size", "und_encoder_kind", "llm.vocab_size", "und_encoder.image_size",
              "und_encoder.patch_size", "gen_encoder.latent_channels")
"""The model settings the data pipeline follows: a start model must have the recipe's."""


def load_part(module: nn.Module, state: dict, source: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # torch's message lists the missing, unexpected and mis-shaped keys
        raise ValueError(f"{source} does not fit the recipe's model: {e}") from None


def check_start(recipe: Recipe, model: JanusFlow, source: str | Path) -> JanusFlow:
    want, got = to_dict(recipe.model), to_dict(model.config)
    for key in START_KEYS:
        a, b = want, got
        for part in key.split("."):
            a, b = a.get(part), b.get(part)
        if a != b:
            raise ValueError(f"{source} has model.{key}={b} but the recipe has model.{key}={a}: start from a "
                             f"model made with this configuration, or change the recipe to match")
    return model


def fresh_model(recipe: Recipe, prep: dict) -> JanusFlow:
    """The recipe's model from ``train.seed``, with the LLM and SigLIP weights of the recipe's (or the prep's) paths."""
    torch.manual_seed(recipe.train.seed)
    model = JanusFlow(recipe.model)
    if prep.get("llm_path"):
        from transformers import LlamaForCausalLM

        llm = LlamaForCausalLM.from_pretrained(prep["llm_path"])
        load_part(model.language_model, llm.state_dict(), f"llm_path {prep['llm_path']}")
    if prep.get("und_encoder_path"):
        state = torch.load(prep["und_encoder_path"], map_location="cpu", weights_only=True)
        load_part(model.vision_und_enc_model, state, f"und_encoder_path {prep['und_encoder_path']}")
    return model


def starting_model(recipe: Recipe, index: int, stage_dir: Callable[[int], Path], prep: dict
                   ) -> tuple[JanusFlow, JanusFlow | None]:
    """Stage ``index``'s starting weights, and the EMA weights to continue from (or None)."""
    init = recipe.stages[index].init_from
    if index > 0 and init == "previous":
        prev = stage_dir(index - 1)
        model = check_start(recipe, JanusFlow.from_pretrained(prev / "final"), prev / "final")
        ema = JanusFlow.from_pretrained(prev / "final_ema") if (prev / "final_ema").exists() else None
        return model, ema
    if init not in (None, "previous"):
        return check_start(recipe, JanusFlow.from_pretrained(init), init), None
    return fresh_model(recipe, prep), None


def stage_seed(seed: int, index: int) -> int:
    """The seed of stage ``index``'s fresh state: a function of (train.seed, stage) alone."""
    return hash_seed(seed, index, 7) % 2**63


def start_directory(recipe: Recipe, index: int, stage_dir: Callable[[int], Path]) -> Path | None:
    """The folder stage ``index`` starts from (the previous stage's final/, a model directory), None when fresh."""
    init = recipe.stages[index].init_from
    if index > 0 and init == "previous":
        return stage_dir(index - 1) / "final"
    return Path(init) if init not in (None, "previous") else None


def load_projector(projector: nn.Module, start: Path | None) -> bool:
    """Load the REPA projector saved beside the start weights into ``projector``; False when there is none."""
    from safetensors.torch import load_file

    if start is None or not (start / PROJECTOR_FILE).exists():
        return False
    load_part(projector, load_file(str(start / PROJECTOR_FILE)), f"the REPA projector {start / PROJECTOR_FILE}")
    return True


def save_projector(state: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / PROJECTOR_FILE))


def check_paths(recipe: Recipe) -> None:
    """Files and folders the recipe names, checked before any work (prep alone can take minutes)."""
    r = recipe
    paths = {"llm_path": r.llm_path, "und_encoder_path": r.und_encoder_path, "codec.path": r.codec.path,
             "tokenizer.path": r.tokenizer.path, "train.deepspeed_config": r.train.deepspeed_config}
    paths |= {f"stages.{i}.init_from": s.init_from for i, s in enumerate(r.stages) if s.init_from != "previous"}
    for key, path in paths.items():
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{key}: {path} does not exist")


def check_run_dir(recipe: Recipe, resume: str, is_rank0: bool) -> None:
    """The run directory: not a finished run when starting afresh, writable, with room for one checkpoint."""
    run_dir = recipe.resolved_run_dir
    stages_dir = run_dir / "stages"
    if resume == "none" and stages_dir.exists() and any(stages_dir.iterdir()):
        raise FileExistsError(f"{run_dir} already holds a run; use --resume auto to continue it, or another run_dir")
    if not is_rank0:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"the run directory {run_dir} is not writable: {e}") from None
    with torch.device("meta"):  # the parameter count without allocating the model
        check_disk_space(run_dir, sum(p.numel() for p in JanusFlow(recipe.model).parameters()))
