"""Freeze policies of the three training stages (paper §3.3, Fig. 3).

- stage1 (adaptation): only the randomly initialised parts train: the linear aligners, the
  generation encoder/decoder, beg_of_und_embed (and the REPA projector, which lives outside the model).
- stage2 (unified pre-training): everything but the SigLIP encoder.
- stage3 (SFT): everything (SigLIP unfrozen). The VAE is never part of the model, so always frozen.
SigLIP's attention-pool head is kept for checkpoint compatibility but never used, so never trained.

With a VAE understanding encoder (``model.und_encoder_kind`` shared_gen / separate_gen, ablations B and C)
the understanding encoder is new, so it trains in every stage like the generation encoder; SigLIP and its
aligner are then off the understanding path (SigLIP is only REPA's frozen target) and never train.
"""

from __future__ import annotations

from torch import nn

NEW_PARTS = (
    "vision_und_enc_aligner", "beg_of_und_embed", "vision_gen_enc_model", "vision_gen_enc_aligner",
    "vision_gen_dec_model", "vision_gen_dec_aligner_norm", "vision_gen_dec_aligner",
    "vision_und_gen_enc_model", "vision_und_gen_enc_aligner",
)
SIGLIP_PATH = ("vision_und_enc_model", "vision_und_enc_aligner")
FREEZE_POLICIES = {
    "stage1": lambda name: name.split(".")[0] in NEW_PARTS,
    "stage2": lambda name: not name.startswith("vision_und_enc_model."),
    "stage3": lambda name: True,
}


UNUSED = ".vision_tower.attn_pool."


def apply_freeze_policy(model: nn.Module, policy: str) -> list[str]:
    """Set requires_grad by the policy; return the names of the trainable parameters."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r} (choose from {sorted(FREEZE_POLICIES)})")
    rule = FREEZE_POLICIES[policy]
    siglip_off_path = model.config.und_encoder_kind != "siglip"
    trainable = []
    for name, p in model.named_parameters():
        off_path = siglip_off_path and name.split(".")[0] in SIGLIP_PATH
        p.requires_grad_(rule(name) and UNUSED not in name and not off_path)
        if p.requires_grad:
            trainable.append(name)
    return trainable
