"""What the understanding path of a JanusFlow model takes, per ``model.und_encoder_kind``.

- ``siglip`` (JanusFlow): SigLIP-normalised pixels [B, 3, S, S] (S = und_encoder.image_size), one token per patch.
- ``shared_gen`` / ``separate_gen`` (the paper's ablations B and C): the image as the VAE sees it ([-1, 1] at
  gen_image_size, padded to square), encoded to scaled latents [B, C, h, w]; one token per gen-encoder patch.

The model itself holds no VAE, so the data side makes pixels and the caller, which has the codec, encodes them:

    pixels = torch.stack([und_pixels(image, cfg) for image in images])     # no codec needed (data workers)
    inputs = und_encoder_inputs(pixels, cfg, codec)                         # what model.encode_und_images takes
    n = num_und_tokens(cfg, codec.latent_shape(cfg.gen_image_size)[1:])     # image placeholders per image
"""

from __future__ import annotations

import torch
from PIL import Image

from janusflow.config import ModelConfig
from janusflow.data.sources import und_transform

VAE_RANGE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # mean / std that map [0, 1] pixels to the VAE's [-1, 1]


def uses_vae(cfg: ModelConfig) -> bool:
    return cfg.und_encoder_kind != "siglip"


def und_pixels(image: Image.Image, cfg: ModelConfig) -> torch.Tensor:
    """One image -> [3, S, S]: SigLIP's preprocessing, or [-1, 1] at gen_image_size for the VAE kinds."""
    if uses_vae(cfg):
        return und_transform(image, cfg.gen_image_size, *VAE_RANGE)
    und = cfg.und_encoder
    return und_transform(image, und.image_size, und.image_mean, und.image_std)


def und_encoder_inputs(pixels: torch.Tensor, cfg: ModelConfig, codec) -> torch.Tensor:
    """``und_pixels`` batch [B, 3, S, S] -> the model's understanding input (scaled latents for the VAE kinds)."""
    if not uses_vae(cfg):
        return pixels
    if codec is None:
        raise ValueError(f"und_encoder_kind={cfg.und_encoder_kind} encodes understanding images with the VAE, "
                         "but no codec was given")
    return codec.encode(pixels.to(next(codec.parameters()).device)).to(pixels.device, pixels.dtype)


def num_und_tokens(cfg: ModelConfig, latent_hw: tuple[int, int] | None = None) -> int:
    """LLM positions of one understanding image (without beg_of_und_embed); the VAE kinds need the latent size."""
    if not uses_vae(cfg):
        und = cfg.und_encoder
        return (und.image_size // und.patch_size) ** 2
    if latent_hw is None:
        raise ValueError(f"und_encoder_kind={cfg.und_encoder_kind}: the token count depends on the latent size")
    gen = cfg.gen_encoder
    pad = max(gen.kernel_size - gen.stride, 0)
    h, w = ((s + 2 * pad - gen.kernel_size) // gen.stride + 1 for s in latent_hw)
    return h * w
