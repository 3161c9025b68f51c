"""Typed recipes: the schema (``schema.py``: dataclasses, defaults = the official values, their rules), the
model presets (``presets.py``) and the loader (``loader.py``: YAML, ``base:``, dotted overrides, validation).

    recipe = load_recipe("2to8", ["stages.1.max_steps=50"])
    recipe.model.llm.hidden_size   # 128
"""

from janusflow.config.loader import apply_overrides, deep_merge, from_dict, load_recipe, model_config, recipe_path
from janusflow.config.presets import MODEL_PRESETS, model_preset_dict
from janusflow.config.schema import (
    CodecConfig,
    ConfigError,
    DataConfig,
    GenDecoderConfig,
    GenEncoderConfig,
    LLMConfig,
    LoggingConfig,
    MixturePhase,
    ModelConfig,
    PrepConfig,
    Recipe,
    RepaConfig,
    ShapesPrepConfig,
    Solver,
    SourceConfig,
    StageConfig,
    TimeSamplingConfig,
    TokenizerConfig,
    TrainConfig,
    UndEncoderConfig,
    to_dict,
)

__all__ = [
    "MODEL_PRESETS", "CodecConfig", "ConfigError", "DataConfig", "GenDecoderConfig", "GenEncoderConfig",
    "LLMConfig", "LoggingConfig", "MixturePhase", "ModelConfig", "PrepConfig", "Recipe", "RepaConfig",
    "ShapesPrepConfig", "Solver", "SourceConfig", "StageConfig", "TimeSamplingConfig", "TokenizerConfig",
    "TrainConfig", "UndEncoderConfig", "apply_overrides", "deep_merge", "from_dict", "load_recipe",
    "model_config", "model_preset_dict", "recipe_path", "to_dict",
]
