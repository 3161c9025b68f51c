"""The text side of the toy SigLIP: pretrained with the vision tower by the prep step (sigmoid loss), kept for
the SigLIP image-text score (janusflow.eval.siglip_score).

``ByteTextTower(width, out_dim)(ids [B, L], mask [B, L]) -> [B, out_dim]`` (byte tokens, mean-pooled). Its file
holds the constructor arguments, the weights and SigLIP's learnt logit scale and bias:

    save_text_tower(path, tower, logit_scale, logit_bias)
    tower, logit_scale, logit_bias = load_text_tower(path)   # logit = exp(logit_scale) * cos + logit_bias
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from janusflow.tokenizer import ByteTokenizer

TEXT_TOWER_FILE = "text_tower.pt"  # its name in the prep's SigLIP folder, beside the vision tower's siglip.pt


class ByteTextTower(nn.Module):
    def __init__(self, width: int, out_dim: int, vocab: int = 272, layers: int = 2, max_len: int = 96):
        super().__init__()
        self.args = dict(width=width, out_dim=out_dim, vocab=vocab, layers=layers, max_len=max_len)
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(width, out_dim)
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.pos[:, : ids.shape[1]], src_key_padding_mask=~mask)
        h = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.proj(h)


def tokenize_captions(captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids [N, max_len] (no BOS, truncated) and their mask."""
    tok = ByteTokenizer()
    ids = torch.zeros(len(captions), max_len, dtype=torch.long)
    mask = torch.zeros(len(captions), max_len, dtype=torch.bool)
    for i, c in enumerate(captions):
        x = tok.encode(c, add_bos=False)[:max_len]
        ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), True
    return ids, mask


def save_text_tower(path: str | Path, tower: ByteTextTower, logit_scale: float, logit_bias: float) -> None:
    torch.save({"args": tower.args, "state_dict": tower.state_dict(), "logit_scale": float(logit_scale),
                "logit_bias": float(logit_bias)}, path)


def load_text_tower(path: str | Path) -> tuple[ByteTextTower, float, float]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tower = ByteTextTower(**saved["args"])
    tower.load_state_dict(saved["state_dict"])
    return tower.eval(), saved["logit_scale"], saved["logit_bias"]
