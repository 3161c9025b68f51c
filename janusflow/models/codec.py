"""Latent codec: a diffusers AutoencoderKL mapping images in [-1, 1] to scaled latents and back.

``encode(x [B, 3, H, W]) -> z [B, C, H/f, W/f]`` already multiplied by the scaling factor, the
space where rectified flow runs (t = 1 is data); ``decode(z)`` divides it out again. The SDXL-VAE
(scaling 0.13025) is the preset for real runs, loaded from a local directory; small configs of
the same class serve the CPU default and the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from janusflow.config import CodecConfig

SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], act_fn="silu", sample_size=1024, scaling_factor=0.13025,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, force_upcast=True,
)
SMALL_VAE_CONFIGS = {
    "tiny": dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, sample_size=32),
    "shapes": dict(block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64),
    # 32 px images -> 16 x 16 x 4 latents (downsampling 2): the same 64 generation tokens as "shapes" at 64 px for a
    # quarter of the codec's pixels, so its prep costs about half.
    "shapes32": dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=32),
}


def vae_config(preset: str) -> dict:
    if preset == "sdxl":
        return dict(SDXL_VAE_CONFIG)
    small = SMALL_VAE_CONFIGS[preset]
    n = len(small["block_out_channels"])
    return {**SDXL_VAE_CONFIG, "scaling_factor": 1.0, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, **small}


class LatentCodec(nn.Module):
    def __init__(self, vae: AutoencoderKL, scaling_factor: float | None = None, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor or vae.config.scaling_factor)
        self.sample_posterior = sample_posterior

    @classmethod
    def from_config(cls, cfg: CodecConfig) -> LatentCodec:
        if cfg.path:
            if not Path(cfg.path).is_dir():
                raise FileNotFoundError(f"codec.path: {cfg.path} is not a directory with an AutoencoderKL")
            vae = AutoencoderKL.from_pretrained(cfg.path)
        else:
            vae = AutoencoderKL.from_config(vae_config(cfg.preset))
        return cls(vae, cfg.scaling_factor, cfg.sample_posterior)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        s = image_size // self.downsample_factor
        return (self.latent_channels, s, s)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if self.sample_posterior else dist.mode()
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.vae.save_pretrained(path)
