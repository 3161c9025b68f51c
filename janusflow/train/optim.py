"""Optimisation pieces the training loop calls: AdamW with the stage's LR schedule, gradient clipping, the EMA of
the weights, and the speed options that leave the maths unchanged.

Schedule (paper Table 1: linear warm-up, then constant; ``decay_steps`` > 0 adds a linear decay to the end):

    lr(step) = lr * min((step + 1) / warmup_steps, 1, (max_steps - step) / decay_steps)
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from janusflow.config import StageConfig, TrainConfig
from janusflow.models.janusflow import JanusFlow
from janusflow.train.distributed import gathered_groups


def lr_factor(stage: StageConfig, step: int) -> float:
    """The LR multiplier for optimizer step ``step`` (0-based): linear warm-up, constant, then linear decay
    over the last ``decay_steps`` steps, reaching 1 / decay_steps on the final step."""
    warmup = min(1.0, (step + 1) / max(stage.warmup_steps, 1))
    if stage.decay_steps == 0:
        return warmup
    return min(warmup, (stage.max_steps - step) / stage.decay_steps)


def build_optimizer(params: list[nn.Parameter], stage: StageConfig, train: TrainConfig, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (the paper's betas and weight decay) and the stage's schedule. The fused kernel makes one pass over
    each tensor instead of a dozen elementwise ops (~10 ms of a CPU step)."""
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, stage))


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total norm of at most ``max_norm`` (0: leave them); return the norm before."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class EMA:
    """Exponential moving average of the model weights (fp32). Every rank keeps one (under ZeRO-3 the parameter
    gather is collective); rank 0 saves it."""

    def __init__(self, model: JanusFlow, decay: float, own: bool = False):
        """Averages start from ``model``'s weights: a copy, or ``model`` itself when ``own`` (a model loaded for
        the purpose, e.g. the previous stage's EMA: no second full copy in memory)."""
        self.decay = decay
        self.model = (model if own else copy.deepcopy(model)).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: JanusFlow, names: list[str]) -> None:
        params = dict(model.named_parameters())
        own = dict(self.model.named_parameters())
        sources, targets = [params[n] for n in names], [own[n] for n in names]
        for part in gathered_groups(sources):
            values = [p.detach().to(t.device, torch.float32) for p, t in zip(sources[part], targets[part])]
            torch._foreach_lerp_(targets[part], values, 1.0 - self.decay)  # one call per group, not per tensor


def apply_speed_options(model: JanusFlow, activation_checkpointing: bool, compile: bool) -> None:
    """Training-only switches that leave the maths unchanged (in place; the state-dict keys stay the same).

    activation_checkpointing: the LLM's decoder layers (transformers) and SigLIP's blocks (timm) keep only
    their inputs and recompute the rest in the backward pass, non-reentrant, so frozen inputs and the REPA
    hidden state of any layer still get their gradients. compile: torch.compile the generation encoder and
    decoder, one static graph per input shape (the number of gen rows in a micro-batch varies, so up to
    micro_batch_size + 1 graphs; beyond torch's recompile limit, 8, a new shape runs eagerly). Static because
    inductor's CPU backend fails on dynamic spatial sizes (torch 2.14), which the one-row placeholder brings.
    """
    if activation_checkpointing:
        model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.vision_und_enc_model.vision_tower.set_grad_checkpointing(True)
    if compile:
        model.vision_gen_enc_model.compile(dynamic=False)
        model.vision_gen_dec_model.compile(dynamic=False)
