"""The exported model directory: everything sampling and chat need, in the official layout.

    <dir>/config.json, preprocessor_config.json, model.safetensors   JanusFlow (official keys)
    <dir>/processor_config.json                                     prompt settings (system prompt, image tokens)
    <dir>/janusflow_tokenizer.json  or HF tokenizer files            the tokenizer
    <dir>/vae/                                                       the AutoencoderKL (diffusers layout)

An official JanusFlow-1.3B download has the first three and the HF tokenizer; its VAE
(stabilityai/sdxl-vae) is a separate directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from janusflow.models.und_inputs import num_und_tokens
from janusflow.tokenizer import OFFICIAL_SYSTEM_PROMPT

PROCESSOR_FILE = "processor_config.json"


def write_processor_config(path: str | Path, system_prompt: str, num_image_tokens: int) -> None:
    cfg = {"sft_format": "deepseek", "system_prompt": system_prompt, "num_image_tokens": num_image_tokens,
           "image_tag": "<image_placeholder>", "image_start_tag": "<begin_of_image>",
           "image_end_tag": "<end_of_image>", "mask_prompt": True, "ignore_id": -100}
    (Path(path) / PROCESSOR_FILE).write_text(json.dumps(cfg, indent=2))


def read_processor_config(path: str | Path) -> dict:
    """Prompt settings of a model dir; the official defaults when the file lacks them."""
    f = Path(path) / PROCESSOR_FILE
    data = json.loads(f.read_text()) if f.exists() else {}
    data.setdefault("system_prompt", OFFICIAL_SYSTEM_PROMPT)
    return data


def export_model(path: str | Path, model, codec, tokenizer, system_prompt: str, state_dict: dict | None = None) -> Path:
    """Write a self-contained model directory (``state_dict`` e.g. the EMA weights)."""
    path = Path(path)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    latent_hw = codec.latent_shape(model.config.gen_image_size)[1:]
    write_processor_config(path, system_prompt, num_und_tokens(model.config, latent_hw))
    codec.save_pretrained(path / "vae")
    return path
