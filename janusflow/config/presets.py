"""Named starting points for ``model:`` (``preset: tiny``): the official 1.3B (the schema's defaults), the CPU toy
world's model and a milliseconds-fast one for tests. A recipe's own ``model`` keys override its preset's."""

from __future__ import annotations

from typing import Any

from janusflow.config.schema import ConfigError


def _tiny_model() -> dict:
    """Milliseconds-fast model for unit tests."""
    return dict(
        llm=dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
        und_encoder=dict(model_name="siglip_tiny", image_size=32, patch_size=8, width=32, layers=2,
                         heads=2, mlp_ratio=2.0),
        gen_encoder=dict(latent_channels=4, channels=16, num_blocks=2),
        gen_decoder=dict(upsamples=1, num_blocks=2),
        gen_image_size=32,
    )


def _shapes_model() -> dict:
    """The embedded CPU default: small enough to train in minutes on 2 cores."""
    return dict(
        llm=dict(vocab_size=272, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
        und_encoder=dict(model_name="siglip_shapes", image_size=64, patch_size=8, width=96, layers=4,
                         heads=4, mlp_ratio=2.0),
        gen_encoder=dict(latent_channels=4, channels=48, num_blocks=2),
        gen_decoder=dict(upsamples=1, num_blocks=2),
        gen_image_size=64,
    )


MODEL_PRESETS: dict[str, Any] = {
    "janusflow-1.3b": lambda: {},
    "tiny": _tiny_model,
    "shapes": _shapes_model,
}


def model_preset_dict(name: str, prefix: str = "model") -> dict:
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ConfigError(f"{prefix}.preset: unknown model preset {name!r} (choose from {sorted(MODEL_PRESETS)})")
    return {"preset": name, **MODEL_PRESETS[name]()}
