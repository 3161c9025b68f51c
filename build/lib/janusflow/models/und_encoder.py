"""Understanding encoder: a SigLIP ViT (timm VisionTransformer) with the official key layout.

``SigLIPTower(cfg)(pixel_values [B, 3, S, S], normalised) -> patch features [B, (S/p)^2, width]``.
State-dict keys live under ``vision_tower.`` exactly as the official ``CLIPVisionTower``; the
``attn_pool`` head is built (the official checkpoint carries it) but never used.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from janusflow.config import UndEncoderConfig


class SigLIPTower(nn.Module):
    def __init__(self, cfg: UndEncoderConfig):
        super().__init__()
        self.vision_tower = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.num_blocks,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            class_token=False,
            global_pool="map",
            num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
        )

    @property
    def num_patches(self) -> int:
        return self.vision_tower.patch_embed.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.vision_tower.patch_embed.img_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != tuple(size):
            raise ValueError(f"the understanding encoder takes images [B, 3, {size[0]}, {size[1]}] "
                             f"(und_encoder.image_size), got {list(pixel_values.shape)}")
        return self.vision_tower.forward_features(pixel_values)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One embedding per image through the attention-pool head (used by SigLIP pretraining)."""
        return self.vision_tower.forward_head(self.forward(pixel_values), pre_logits=True)
