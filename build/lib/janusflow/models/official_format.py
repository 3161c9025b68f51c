"""The official JanusFlow checkpoint layout: config.json <-> ModelConfig, and weight files.

config.json (written by the official ``MultiModalityConfig``) has ``model_type: multi_modality``
and four blocks: ``language_config`` (a LlamaConfig dict) and ``vision_und_enc_config`` /
``vision_gen_enc_config`` / ``vision_gen_dec_config``, each ``{cls, model_type, params}`` plus the
generic PretrainedConfig fields. Weights: model.safetensors or pytorch_model.bin, either possibly
sharded with an ``*.index.json``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from janusflow.config import (
    GenDecoderConfig,
    GenEncoderConfig,
    LLMConfig,
    ModelConfig,
    UndEncoderConfig,
)

# The official SigLIP size table (siglip_vit.SigLIP_MODEL_CONFIG), for configs that only name a model.
SIGLIP_SIZES = {
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0),
    "siglip_large_patch16_256": dict(image_size=256, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0),
    "siglip_so400m_patch14_384": dict(image_size=336, patch_size=14, width=1152, layers=27, heads=16,
                                      mlp_ratio=3.7362),
}
_LLM_KEYS = [f for f in LLMConfig.__dataclass_fields__ if f != "attn_implementation"]


def config_to_official(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """ModelConfig -> the official config.json dict (extra size keys ride along in ``params``)."""
    from janusflow.models.llm import llama_config

    und, gen, dec = cfg.und_encoder, cfg.gen_encoder, cfg.gen_decoder
    hidden = cfg.llm.hidden_size
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "janusflow_preset": cfg.preset,
        "gen_image_size": cfg.gen_image_size,
        "janusflow_und_encoder_kind": cfg.und_encoder_kind,
        "language_config": llama_config(cfg.llm).to_dict(),
        "vision_und_enc_config": {
            "cls": "CLIPVisionTower", "model_type": "vision_und_enc",
            "params": dict(model_name=und.model_name, image_size=und.image_size, select_feature="same",
                           select_layer=und.select_layer, patch_size=und.patch_size, width=und.width,
                           layers=und.layers, heads=und.heads, mlp_ratio=und.mlp_ratio),
        },
        "vision_gen_enc_config": {
            "cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc",
            "params": dict(input_channels=gen.latent_channels, stride=gen.stride, kernel_size=gen.kernel_size,
                           block_out_channels=[gen.channels], layers_in_middle=gen.num_blocks, hidden_size=hidden,
                           elementwise_affine=True, use_bias=gen.use_bias, norm_eps=gen.norm_eps, dropout=0.0,
                           use_mid_block=True),
        },
        "vision_gen_dec_config": {
            "cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec",
            "params": dict(in_channels=gen.channels, out_channels=gen.latent_channels,
                           block_out_channels=[gen.channels], upsamples=dec.upsamples,
                           layers_in_middle=dec.num_blocks, hidden_size=hidden, elementwise_affine=True,
                           norm_eps=gen.norm_eps, use_bias=gen.use_bias, dropout=0.0, use_mid_block=True),
        },
    }


def preprocessor_config(cfg: ModelConfig) -> dict:
    und = cfg.und_encoder
    return {"image_processor_type": "VLMImageProcessor", "image_size": und.image_size, "min_size": 14,
            "image_mean": und.image_mean, "image_std": und.image_std, "rescale_factor": 1 / 255,
            "do_normalize": True}


def official_to_config(data: dict, preprocessor: dict | None = None) -> ModelConfig:
    """The official config.json dict -> ModelConfig (inferred sizes follow janusflow_facts.md)."""
    if data.get("model_type") != "multi_modality":
        raise ValueError(f"config.json has model_type {data.get('model_type')!r}, expected 'multi_modality'")
    for block in ("language_config", "vision_und_enc_config", "vision_gen_enc_config", "vision_gen_dec_config"):
        if block not in data:
            raise ValueError(f"config.json lacks the {block!r} block of a JanusFlow model")
    lang = data["language_config"]
    llm = LLMConfig(**{k: lang[k] for k in _LLM_KEYS if k in lang})
    up = data["vision_und_enc_config"].get("params", {})
    name = up.get("model_name", "siglip_large_patch16_384")
    sizes = dict(SIGLIP_SIZES.get(name, {}))
    sizes.update({k: up[k] for k in ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio") if k in up})
    und = UndEncoderConfig(model_name=name, select_layer=up.get("select_layer", -2), **sizes)
    if preprocessor:
        und.image_mean = list(preprocessor.get("image_mean", und.image_mean))
        und.image_std = list(preprocessor.get("image_std", und.image_std))
    ep = data["vision_gen_enc_config"].get("params", {})
    dp = data["vision_gen_dec_config"].get("params", {})
    gen = GenEncoderConfig(
        latent_channels=ep.get("input_channels", 4), channels=ep.get("block_out_channels", [768])[-1],
        kernel_size=ep.get("kernel_size", 2), stride=ep.get("stride", 2), num_blocks=ep.get("layers_in_middle", 2),
        norm_eps=ep.get("norm_eps", 1e-6), use_bias=ep.get("use_bias", True))
    dec = GenDecoderConfig(upsamples=dp.get("upsamples", 1), num_blocks=dp.get("layers_in_middle", 2))
    if dp.get("out_channels", gen.latent_channels) != gen.latent_channels:
        raise ValueError("vision_gen_dec_config.params.out_channels must equal the encoder's input_channels")
    return ModelConfig(preset=data.get("janusflow_preset", "janusflow-1.3b"), llm=llm, und_encoder=und,
                       gen_encoder=gen, gen_decoder=dec, gen_image_size=data.get("gen_image_size", 384),
                       und_encoder_kind=data.get("janusflow_und_encoder_kind", "siglip"))


def read_model_config(path: Path) -> ModelConfig:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a JanusFlow model directory")
    pre_file = path / "preprocessor_config.json"
    pre = _read_json(pre_file) if pre_file.exists() else None
    data = _read_json(cfg_file)
    try:
        return official_to_config(data, pre)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # e.g. the config.json of another kind of model
        raise ValueError(f"{cfg_file}: {e}") from None


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """One weight file (safetensors or a torch pickle); a truncated or foreign file gives an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"weight file {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read the weights {file}: {e}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors or .bin, single file or sharded."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_weights(path / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return _load_weights(path / name)
    raise FileNotFoundError(f"{path} has no model.safetensors, pytorch_model.bin or shard index")
