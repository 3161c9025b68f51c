"""Rectified-flow path (JanusFlow / flow_matching convention: t = 0 is noise, t = 1 is data).

    z_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I) noise, x1 the (scaled) data latent
    v   = dz_t/dt = x1 - x0        (the regression target of L_RF)

Time sampling: logit-normal (SD3; symmetric, so the same under t -> 1 - t) or uniform.

    t = sample_t(batch, generator=g)              # [B] in (0, 1)
    z_t, v = noisy_latents(x1, t, noise_seed)    # x0 ~ N(0, I) drawn from the seed; fp32
    loss = rf_loss(v_pred, v)
"""

from __future__ import annotations

import torch


def sample_t(batch: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
             generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Training times t [B] in (0, 1)."""
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    raise ValueError(f"unknown time sampling {kind!r} (logit_normal or uniform)")


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x1, x0 [B, ...], t [B] -> (z_t, target velocity x1 - x0)."""
    tt = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return tt * x1 + (1 - tt) * x0, x1 - x0


def noisy_latents(x1: torch.Tensor, t: torch.Tensor, noise_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x1 [B, C, h, w], t [B] -> (z_t, target velocity), both fp32, with x0 ~ N(0, I) drawn on the CPU from
    ``noise_seed`` (the same noise on any device and for any batch placement)."""
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(noise_seed)).to(x1.device)
    return interpolate(x1.float(), x0, t.float())


def rf_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (L_RF)."""
    return torch.mean((v_pred.float() - v_target.float()) ** 2)


def euler_times(steps: int) -> list[float]:
    """The official schedule t_k = k / N, k = 0..N-1 (no evaluation at t = 1)."""
    return [k / steps for k in range(steps)]
