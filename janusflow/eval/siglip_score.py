"""SigLIP image-text score: how well images match their captions, judged by the prep's SigLIP (both towers).

For a pair (image, caption), with L2-normalised embeddings (the vision tower's attention-pool output and the
text tower's), ``cos = <f_img, f_txt>`` and SigLIP's own match probability is
``p = sigmoid(exp(logit_scale) * cos + logit_bias)``. A set of pairs scores the mean p (``siglip_score``) and the
mean cos (``siglip_cosine``): the CLIP-score column of the paper's ablation table, with the encoder the toy world
has. The judge is fixed (the prep's towers, not the model being evaluated), so scores compare across runs.

    judge = SigLIPJudge.from_dir(prep["siglip_dir"])        # runs/_cache/siglip-<hash>
    judge.score(images, captions)                           # {"siglip_score": ..., "siglip_cosine": ...}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from janusflow.config import UndEncoderConfig, from_dict
from janusflow.data.transforms import siglip_pixels
from janusflow.models.siglip_text import TEXT_TOWER_FILE, ByteTextTower, load_text_tower, tokenize_captions
from janusflow.models.und_encoder import SigLIPTower


class SigLIPJudge(nn.Module):
    def __init__(self, vision: SigLIPTower, und_cfg: UndEncoderConfig, text: ByteTextTower, logit_scale: float,
                 logit_bias: float):
        super().__init__()
        self.vision, self.text, self.und_cfg = vision.eval(), text.eval(), und_cfg
        self.logit_scale, self.logit_bias = logit_scale, logit_bias

    @classmethod
    def from_dir(cls, path: str | Path) -> SigLIPJudge:
        """The prep's SigLIP folder: siglip.pt (vision), text_tower.pt, prep.json (the vision config)."""
        path = Path(path)
        missing = [f for f in ("siglip.pt", TEXT_TOWER_FILE, "prep.json") if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is not a prepared SigLIP folder with both towers (missing "
                                    f"{', '.join(missing)}); the prep step (prep.siglip_steps > 0) writes one")
        cfg = from_dict(UndEncoderConfig, json.loads((path / "prep.json").read_text())["und_encoder"], "und_encoder")
        vision = SigLIPTower(cfg)
        vision.load_state_dict(torch.load(path / "siglip.pt", map_location="cpu", weights_only=True))
        return cls(vision, cfg, *load_text_tower(path / TEXT_TOWER_FILE))

    @torch.no_grad()
    def pair_cosines(self, images: Sequence[Image.Image], captions: Sequence[str],
                     batch_size: int = 64) -> torch.Tensor:
        """Cosine similarity [N] of image i with caption i."""
        if len(images) != len(captions) or not images:
            raise ValueError(f"{len(images)} images for {len(captions)} captions (need >= 1 pair)")
        cfg, out = self.und_cfg, []
        for s in range(0, len(images), batch_size):
            pixels = torch.stack([siglip_pixels(im, cfg) for im in images[s:s + batch_size]])
            ids, mask = tokenize_captions(list(captions[s:s + batch_size]), self.text.max_len)
            img = F.normalize(self.vision.pooled(pixels), dim=-1)
            txt = F.normalize(self.text(ids, mask), dim=-1)
            out.append((img * txt).sum(-1))
        return torch.cat(out)

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> dict[str, float]:
        cos = self.pair_cosines(images, captions)
        prob = torch.sigmoid(cos * torch.tensor(self.logit_scale).exp() + self.logit_bias)
        return {"siglip_score": prob.mean().item(), "siglip_cosine": cos.mean().item()}
