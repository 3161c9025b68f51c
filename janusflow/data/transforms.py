"""Every image -> tensor step of janusflow: what the codec, SigLIP and the VAE understanding encoders see.

Generation (paper §4.2): resize the short side to the generation size (bicubic), then a square crop, random in
training and centred for the latent cache and evaluation: ``gen_crop(image)`` -> uint8 [3, S, S]. The codec takes
``gen_pixels(crop)`` -> float [3, S, S] in [-1, 1].

SigLIP (the official ``VLMImageProcessor``): resize the long side to its size (bicubic, aspect kept, at least
14 px), pad to a square with the mean colour, rescale to [0, 1], normalise: ``siglip_pixels(image)``.
REPA's target is SigLIP's view of the generation crop itself: ``siglip_view(crop)`` (already square, so only
resized when the sizes differ, on the tensor; no PIL round trip), the same numbers as ``siglip_pixels`` of the crop.

The paper's ablations B and C read understanding images with the VAE: letterboxed like SigLIP's at the
generation size, in [-1, 1]. ``und_pixels(image, cfg)`` picks by ``model.und_encoder_kind``.
Shapes: a single image [3, H, W] or a batch [B, 3, H, W] wherever a tensor is taken.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from janusflow.config import ModelConfig, UndEncoderConfig

UND_MIN_SIZE = 14  # the official VLMImageProcessor's min_size
VAE_RANGE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # mean / std that map [0, 1] pixels to the VAE's [-1, 1]


def to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W] (RGB)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return pixels.float().div_(255.0)


def normalize(unit: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 1] pixels [..., 3, H, W] -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=unit.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=unit.device).view(3, 1, 1)
    return (unit - m) / s


# ----------------------------------------------------------------------------- generation


def gen_crop(image: Image.Image, size: int, rng: random.Random | None = None) -> torch.Tensor:
    """The paper's generation preprocessing: short side to ``size`` (bicubic), then a random square crop drawn
    from ``rng`` (centred when None) -> uint8 [3, size, size]."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if rng is None:
        x0, y0 = (nw - size) // 2, (nh - size) // 2
    else:
        x0, y0 = rng.randint(0, nw - size), rng.randint(0, nh - size)
    return to_uint8(image.crop((x0, y0, x0 + size, y0 + size)))


def gen_pixels(crops: torch.Tensor) -> torch.Tensor:
    """uint8 generation crops -> the codec's input, float32 in [-1, 1]."""
    return to_unit(crops).mul_(2.0).sub_(1.0)


# ----------------------------------------------------------------------------- understanding


def letterbox(image: Image.Image, size: int, mean: Sequence[float]) -> Image.Image:
    """The official resize and pad: long side to ``size`` keeping the aspect (``int()`` truncation, at least 14 px,
    bicubic), then centred on a square of the colour ``int(mean * 255)``."""
    w, h = image.size
    long = max(w, h)
    min_size = min(UND_MIN_SIZE, size)
    nw, nh = max(int(w / long * size), min_size), max(int(h / long * size), min_size)
    image = image.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    if nw == nh:
        return image
    side = max(nw, nh)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    square.paste(image, ((side - nw) // 2, (side - nh) // 2))
    return square


def siglip_pixels(image: Image.Image, und: UndEncoderConfig) -> torch.Tensor:
    """Any image -> SigLIP's input [3, S, S] (S = und.image_size), as the official processor makes it."""
    return normalize(to_unit(to_uint8(letterbox(image, und.image_size, und.image_mean))), und.image_mean, und.image_std)


def siglip_view(crops: torch.Tensor, und: UndEncoderConfig) -> torch.Tensor:
    """Square images (uint8, or float in [0, 1]) [..., 3, H, H] -> SigLIP's input [..., 3, S, S] (REPA's target
    input); resized on the tensor (bicubic, antialiased) only when H != S."""
    unit = to_unit(crops) if crops.dtype == torch.uint8 else crops
    if unit.shape[-1] != und.image_size:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2.functional import resize

        unit = resize(unit, [und.image_size, und.image_size], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    return normalize(unit, und.image_mean, und.image_std)


def und_pixels(image: Image.Image, cfg: ModelConfig) -> torch.Tensor:
    """An understanding image -> [3, S, S]: SigLIP's input, or the VAE's ([-1, 1] at gen_image_size,
    letterboxed) for the VAE kinds, which the codec then encodes (janusflow.models.und_inputs)."""
    if not cfg.und_uses_vae:
        return siglip_pixels(image, cfg.und_encoder)
    mean, std = VAE_RANGE
    return normalize(to_unit(to_uint8(letterbox(image, cfg.gen_image_size, mean))), mean, std)
