"""What the understanding path of a JanusFlow model takes, per ``model.und_encoder_kind``.

- ``siglip`` (JanusFlow): SigLIP-normalised pixels [B, 3, S, S] (S = und_encoder.image_size), one token per patch.
- ``shared_gen`` / ``separate_gen`` (the paper's ablations B and C): the image as the VAE sees it ([-1, 1] at
  gen_image_size, padded to square), encoded to scaled latents [B, C, h, w]; one token per gen-encoder patch.

The model itself holds no VAE: the data side makes pixels (``janusflow.data.transforms.und_pixels``) and the
caller, which has the codec, encodes them:

    inputs = und_encoder_inputs(pixels, cfg, codec)                         # what model.encode_und_images takes
    n = num_und_tokens(cfg, codec.latent_shape(cfg.gen_image_size)[1:])     # image placeholders per image
"""

from __future__ import annotations

import torch

from janusflow.config import ModelConfig
from janusflow.models.gen_encdec import token_grid


def und_encoder_inputs(pixels: torch.Tensor, cfg: ModelConfig, codec) -> torch.Tensor:
    """``und_pixels`` batch [B, 3, S, S] -> the model's understanding input (scaled latents for the VAE kinds)."""
    if not cfg.und_uses_vae:
        return pixels
    if codec is None:
        raise ValueError(f"und_encoder_kind={cfg.und_encoder_kind} encodes understanding images with the VAE, "
                         "but no codec was given")
    return codec.encode(pixels.to(next(codec.parameters()).device)).to(pixels.device, pixels.dtype)


def num_und_tokens(cfg: ModelConfig, latent_hw: tuple[int, int] | None = None) -> int:
    """LLM positions of one understanding image (without beg_of_und_embed); the VAE kinds need the latent size."""
    if not cfg.und_uses_vae:
        und = cfg.und_encoder
        return (und.image_size // und.patch_size) ** 2
    if latent_hw is None:
        raise ValueError(f"und_encoder_kind={cfg.und_encoder_kind}: the token count depends on the latent size")
    h, w = token_grid(latent_hw, cfg.gen_encoder.kernel_size, cfg.gen_encoder.stride)
    return h * w
