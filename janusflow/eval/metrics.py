"""Evaluation metrics: Frechet distance in an encoder's feature space, VQA accuracy, RF validation loss.

Frechet distance (FD) between Gaussians fitted to two feature sets, with the maths of pytorch-fid /
clean-fid (mean, unbiased covariance, ``scipy.linalg.sqrtm`` of S1 S2 with an eps retry):

    FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

Here the features are the understanding encoder's (SigLIP) patch features, mean-pooled per image,
so "FID" becomes "FD in SigLIP space"; it is comparable only between runs that share the encoder
(stage 2 freezes SigLIP, so both arms of a REPA comparison do).

    mu, sigma = feature_stats(features)               # features [N, D]
    fd = frechet_distance(mu, sigma, mu_ref, sigma_ref)

VQA accuracy is the exact match of normalised answers; the RF validation loss is L_RF at fixed
times with fixed noise (t = 0 is noise, t = 1 is data), so checkpoints are compared on equal terms.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from janusflow.config import UndEncoderConfig
from janusflow.data.transforms import siglip_pixels
from janusflow.flow import interpolate, rf_loss

RF_VAL_TIMES: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


# ----------------------------------------------------------------------------- Frechet distance


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mu [D], sigma [D, D]) in float64: the mean and the unbiased covariance."""
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    x = x.astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (mu [D], sigma [D, D])."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than dimensions) has no finite root: regularise, as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"the matrix square root has an imaginary component of {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, images: Sequence[Image.Image], und: UndEncoderConfig,
                     batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled patch features [N, D] of PIL images through ``encoder`` (pixels [B, 3, S, S] -> [B, M, D]),
    with SigLIP's preprocessing (janusflow.data.transforms.siglip_pixels)."""
    ref = next(encoder.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([siglip_pixels(im, und) for im in images[start:start + batch_size]])
        out.append(encoder(pixels.to(ref.device, ref.dtype)).float().mean(dim=1).cpu())
    return torch.cat(out)


def frechet_distance_of(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FD between the Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# ----------------------------------------------------------------------------- VQA


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding punctuation or articles, single spaces: "Red." -> "red"."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact-match accuracy of predicted answers against the references, after ``normalize_answer``."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references (need >= 1)")
    return float(np.mean([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]))


# ----------------------------------------------------------------------------- RF validation loss


@torch.no_grad()
def rf_val_loss(model, latents: torch.Tensor, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                noise: torch.Tensor, times: Sequence[float] = RF_VAL_TIMES, batch_size: int = 64) -> dict[str, float]:
    """L_RF of ``model`` at each fixed t, with the prompt and no CFG dropout.

    latents, noise [N, C, H, W] (t = 1 data, t = 0 noise); prefix_ids / prefix_mask [N, P]: left-padded
    prompts without the begin-of-image tag (the training prefix). Returns {"rf_val/t=0.1": ..., "rf_val": mean}.
    """
    device, dtype = model.beg_of_und_embed.device, model.dtype_for_llm
    out: dict[str, float] = {}
    for t in times:
        total = 0.0
        for s in range(0, latents.shape[0], batch_size):
            x1, x0 = latents[s:s + batch_size].to(device, dtype), noise[s:s + batch_size].to(device, dtype)
            tt = torch.full((x1.shape[0],), float(t), device=device, dtype=dtype)
            z_t, target = interpolate(x1, x0, tt)
            prefix = model.embed_tokens(prefix_ids[s:s + batch_size].to(device))
            v, _ = model.forward_gen(prefix, prefix_mask[s:s + batch_size].to(device), z_t, tt)
            total += rf_loss(v, target).item() * x1.shape[0]
        out[f"rf_val/t={t:g}"] = total / latents.shape[0]
    out["rf_val"] = float(np.mean([out[f"rf_val/t={t:g}"] for t in times]))
    return out
