"""Tiny model directories for the tool tests: our exported layout, and a stand-in of the official download.

The stand-in is what a user of the released weights has: config.json in the official MultiModalityConfig
layout, pytorch_model.bin (bfloat16, official keys), HF tokenizer files, and the VAE in its own directory
(stabilityai/sdxl-vae), passed with --vae.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from janusflow.config import CodecConfig, model_config
from janusflow.export import export_model
from janusflow.models.codec import LatentCodec, vae_config
from janusflow.models.janusflow import JanusFlow
from janusflow.tokenizer import ByteTokenizer, train_bpe_tokenizer
from tests.conftest import randomize
from tests.test_model import official_config_json

TOKENIZER_TEXTS = ["a red circle", "two blue squares above a green triangle", "Is there a cross in the image?"] * 4


def tiny_parts(seed: int = 0) -> tuple[JanusFlow, LatentCodec]:
    torch.manual_seed(seed)
    model = randomize(JanusFlow(model_config("tiny")), seed=seed).eval()
    return model, LatentCodec.from_config(CodecConfig(preset="tiny"))


def exported_dir(root: Path) -> Path:
    """Our export (model.safetensors, byte tokenizer, vae/ inside)."""
    model, codec = tiny_parts()
    return export_model(root / "export", model, codec, ByteTokenizer(), "You are a test assistant.")


def official_dirs(root: Path) -> tuple[Path, Path]:
    """(model dir in the official layout, separate VAE dir): tiny weights, but the release's geometry.

    The official config.json has no image size, so the model draws 384 px images; a VAE with the SDXL-VAE's
    8x downsampling (48 x 48 latents, 576 image tokens) and a context of 1024 make that fit the tiny model.
    """
    torch.manual_seed(0)
    model = randomize(JanusFlow(model_config("tiny", llm={"max_position_embeddings": 1024}))).eval()
    vae = AutoencoderKL.from_config({**vae_config("tiny"), "block_out_channels": [8, 8, 16, 16],
                                     "down_block_types": ["DownEncoderBlock2D"] * 4,
                                     "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.13025})
    codec = LatentCodec(vae)
    model_dir, vae_dir = root / "JanusFlow-standin", root / "sdxl-vae-standin"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(official_config_json(model)))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if "attn_pool" not in k}
    torch.save(state, model_dir / "pytorch_model.bin")
    train_bpe_tokenizer(TOKENIZER_TEXTS, model.config.llm.vocab_size, model_dir)
    codec.vae.save_pretrained(str(vae_dir))
    return model_dir, vae_dir
