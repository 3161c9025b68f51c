"""REPA (representation alignment, arXiv 2410.06940) as JanusFlow uses it; training-only.

A 3-layer MLP projects the LLM hidden state after block K at the image positions to the
understanding encoder's width; the loss is the negative mean per-token cosine similarity with the
frozen SigLIP patch features of the clean image (no gradient into SigLIP):

    L_REPA = -mean_{b, n} cos(proj(h[b, n]), stop_grad(f_enc(x)[b, n]))

The projector is never exported: the released model has no such module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_projector(hidden_size: int, projector_dim: int, target_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear -> SiLU -> Linear, as in the REPA reference code."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, target_dim),
    )


def match_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize encoder patch features [B, M, D] (square grid) to the generation grid [B, h*w, D]."""
    b, m, d = features.shape
    side = int(round(m**0.5))
    if (side, side) == tuple(grid):
        return features
    f = features.transpose(1, 2).reshape(b, d, side, side)
    f = F.interpolate(f.float(), size=grid, mode="bilinear", align_corners=False).to(features.dtype)
    return f.flatten(2).transpose(1, 2)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """projected, target [B, N, D] -> -mean cosine similarity (a scalar in [-1, 1])."""
    return -F.cosine_similarity(projected.float(), target.detach().float(), dim=-1).mean()
