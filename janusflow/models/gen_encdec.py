"""Generation encoder and decoder (the official ShallowUViTEncoder / ShallowUViTDecoder).

Encoder: noisy latent z_t [B, C, H, W] and time t (already x1000) ->
    tokens [B, D, H/2, W/2] (2x2 patchify + time-conditioned ConvNeXt blocks),
    t_emb [B, hidden] (the LLM's time token and the blocks' condition),
    skips [tokens] (the long skip to the decoder).
Decoder: LLM features [B, D, h, w] + skip + t_emb -> velocity [B, C, 2h, 2w]
    (RMSNorm, concat with the skip, ConvNeXt blocks on 2D channels, RMSNorm + 1x1 conv + pixel shuffle).

Attribute names and maths follow the official code so its state dict loads key-for-key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from timm.layers.grn import GlobalResponseNorm as TimmGlobalResponseNorm
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class GlobalResponseNorm(TimmGlobalResponseNorm):
    """timm's channels-last GRN, with the official parameter shape (1, 1, 1, dim)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6, channels_last=True)
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))


def rms_norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a channels-last norm to an NCHW tensor."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNextBlock(nn.Module):
    """ConvNeXt-V2 block whose output is modulated by t_emb *after* the residual (AdaLN-style)."""

    def __init__(self, channels: int, norm_eps: float, use_bias: bool, hidden_size: int, ffn_factor: int = 4):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=use_bias)
        self.norm = LlamaRMSNorm(channels, norm_eps)
        self.channelwise_linear_1 = nn.Linear(channels, channels * ffn_factor, bias=use_bias)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(channels * ffn_factor)
        self.channelwise_linear_2 = nn.Linear(channels * ffn_factor, channels, bias=use_bias)
        self.channelwise_dropout = nn.Dropout(0.0)
        self.cond_embeds_mapper = nn.Linear(hidden_size, channels * 2, bias=use_bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = self.channelwise_linear_1(self.norm(h))
        h = self.channelwise_norm(self.channelwise_act(h))
        h = self.channelwise_dropout(self.channelwise_linear_2(h))
        x = x + h.permute(0, 3, 1, 2)
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return torch.addcmul(shift[:, :, None, None], x, 1 + scale[:, :, None, None])


class UVitBlock(nn.Module):
    """A stack of conditioned ConvNeXt blocks (official ``mid_block.res_blocks``)."""

    def __init__(self, channels: int, num_blocks: int, hidden_size: int, norm_eps: float, use_bias: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ConvNextBlock(channels, norm_eps, use_bias, hidden_size) for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


def patch_padding(kernel_size: int, stride: int) -> int:
    """The official patchify conv's padding (``ceil(kernel_size - stride)``, never negative)."""
    return max(kernel_size - stride, 0)


def token_grid(latent_hw: tuple[int, int], kernel_size: int, stride: int) -> tuple[int, int]:
    """(h, w) of the generation encoder's token grid for a latent of spatial size ``latent_hw``."""
    pad = patch_padding(kernel_size, stride)
    h, w = ((side + 2 * pad - kernel_size) // stride + 1 for side in latent_hw)
    return h, w


class ShallowUViTEncoder(nn.Module):
    """z_t, t*1000 -> (tokens [B, D, h, w], t_emb [B, hidden], skips)."""

    def __init__(self, latent_channels: int, channels: int, hidden_size: int, kernel_size: int = 2,
                 stride: int = 2, num_blocks: int = 2, norm_eps: float = 1e-6, use_bias: bool = True):
        super().__init__()
        self.time_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(channels, hidden_size, sample_proj_bias=use_bias)
        self.in_conv = nn.Conv2d(latent_channels, channels, kernel_size, stride, patch_padding(kernel_size, stride))
        self.mid_block = UVitBlock(channels, num_blocks, hidden_size, norm_eps, use_bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        self.check_input(x)
        t = torch.as_tensor(timesteps, device=x.device).flatten().expand(x.shape[0])
        t_emb = self.time_embed(self.time_proj(t).to(x.dtype))
        x_emb = self.mid_block(self.in_conv(x), t_emb)
        return x_emb, t_emb, [x_emb]


    def check_input(self, x: torch.Tensor) -> None:
        """A clear error for a latent of the wrong shape, instead of a convolution error deep in torch."""
        conv = self.in_conv
        k, s = conv.kernel_size[0], conv.stride[0]
        if x.dim() != 4 or x.shape[1] != conv.in_channels:
            raise ValueError(f"the generation encoder takes latents [B, {conv.in_channels}, H, W], got {list(x.shape)}")
        grid = token_grid(tuple(x.shape[2:]), k, s)
        for side, tokens in zip(x.shape[2:], grid):
            if side < k or tokens * s != side:  # the decoder would not give this size back
                raise ValueError(f"latent size {tuple(x.shape[2:])} does not fit the generation encoder "
                                 f"(kernel {k}, stride {s}): sides must be multiples of {s}, at least {k}")


class Unpatchify(nn.Module):
    """RMSNorm -> 1x1 conv to out*p*p channels -> pixel shuffle (x p)."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, norm_eps: float, use_bias: bool):
        super().__init__()
        self.norm = LlamaRMSNorm(in_channels, norm_eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch_size**2, 1, bias=use_bias)
        self.pixel_shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(rms_norm_2d(self.norm, x)))


class ShallowUViTDecoder(nn.Module):
    """(LLM features [B, D, h, w], skips, t_emb) -> velocity [B, C, h*2^u, w*2^u]."""

    def __init__(self, channels: int, latent_channels: int, hidden_size: int, upsamples: int = 1,
                 num_blocks: int = 2, norm_eps: float = 1e-6, use_bias: bool = True):
        super().__init__()
        width = 2 * channels
        self.mid_block = UVitBlock(width, num_blocks, hidden_size, norm_eps, use_bias)
        self.out_convs = nn.ModuleList(
            Unpatchify(width if i == 0 else channels, latent_channels if i == upsamples - 1 else channels,
                       2, norm_eps, use_bias)
            for i in range(upsamples)
        )
        self.input_norm = LlamaRMSNorm(channels, norm_eps)

    def forward(self, x: torch.Tensor, hs: list[torch.Tensor], t_emb: torch.Tensor) -> torch.Tensor:
        if len(hs) != 1:
            raise ValueError(f"the decoder takes exactly one skip tensor, got {len(hs)}")
        x = torch.cat([rms_norm_2d(self.input_norm, x), hs[0]], dim=1)
        x = self.mid_block(x, t_emb)
        for conv in self.out_convs:
            x = conv(x)
        return x
