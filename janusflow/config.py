"""Typed configuration: dataclasses for the model, codec, data, training and stages.

Recipes are YAML files that only state what differs from the defaults (the defaults are the
official JanusFlow values). ``load_recipe(path, overrides)`` reads one, applies dotted overrides
such as ``train.log_every=5`` or ``stages.0.max_steps=20``, and validates everything before any
work starts: an unknown key or a value of the wrong type raises ``ConfigError`` naming the key.

    recipe = load_recipe("recipes/2to8.yaml", ["stages.1.max_steps=50"])
    recipe.model.llm.hidden_size   # 192
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from janusflow.tokenizer import OFFICIAL_SYSTEM_PROMPT

_FLOAT_WITHOUT_DOT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the offending key."""


# ----------------------------------------------------------------------------- model


@dataclass
class LLMConfig:
    """The decoder-only LLM (a transformers LlamaForCausalLM)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa, eager or flash_attention_2."""


@dataclass
class UndEncoderConfig:
    """The SigLIP vision tower used for understanding (and as the REPA target)."""

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    select_layer: int = -1
    """Official convention: keep ``layers + select_layer + 1`` blocks when <= 0."""
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @property
    def num_blocks(self) -> int:
        if self.select_layer <= 0:
            return min(self.layers, self.layers + self.select_layer + 1)
        return min(self.layers, self.select_layer)


@dataclass
class GenEncoderConfig:
    """ShallowUViTEncoder: patchify conv + conditioned ConvNeXt blocks."""

    latent_channels: int = 4
    channels: int = 768
    kernel_size: int = 2
    stride: int = 2
    num_blocks: int = 2
    norm_eps: float = 1e-6
    use_bias: bool = True


@dataclass
class GenDecoderConfig:
    """ShallowUViTDecoder: ConvNeXt blocks on [llm features, skip] then pixel-shuffle."""

    upsamples: int = 1
    num_blocks: int = 2


@dataclass
class ModelConfig:
    """The whole JanusFlow model. ``preset`` names a starting point that the other keys override."""

    preset: str = "janusflow-1.3b"
    llm: LLMConfig = field(default_factory=LLMConfig)
    und_encoder: UndEncoderConfig = field(default_factory=UndEncoderConfig)
    gen_encoder: GenEncoderConfig = field(default_factory=GenEncoderConfig)
    gen_decoder: GenDecoderConfig = field(default_factory=GenDecoderConfig)
    gen_image_size: int = 384
    """Pixel size of generated images (the codec turns it into the latent size)."""
    und_encoder_kind: Literal["siglip", "shared_gen", "separate_gen"] = "siglip"
    """The understanding image encoder: ``siglip`` (JanusFlow, decoupled), ``shared_gen`` (VAE latents through
    the generation encoder and aligner at t = 1: one encoder for both tasks, the paper's ablation B) or
    ``separate_gen`` (VAE latents through a second encoder + aligner of the generation encoder's architecture,
    ablation C). SigLIP is built in every case: it stays REPA's target and the FD feature space."""


@dataclass
class CodecConfig:
    """The latent codec (diffusers AutoencoderKL). t=1 latents are ``encode(x) * scaling_factor``."""

    preset: Literal["sdxl", "tiny", "shapes", "shapes32"] = "sdxl"
    path: str | None = None
    """Local directory of a pretrained AutoencoderKL (e.g. a copy of stabilityai/sdxl-vae)."""
    scaling_factor: float | None = None
    """Overrides the preset's / checkpoint's scaling factor when set."""
    sample_posterior: bool = False
    """Encode with a posterior sample instead of its mode."""


@dataclass
class TokenizerConfig:
    kind: Literal["byte", "hf"] = "byte"
    path: str | None = None
    """For kind=hf: a local directory with the HF tokenizer files."""


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One dataset on disk. ``format`` picks the loader in janusflow.data.sources."""

    path: str = ""
    format: Literal["llava_json", "caption_jsonl", "webdataset", "text_jsonl"] = "caption_jsonl"
    image_root: str | None = None
    weight: float = 1.0


@dataclass
class ShapesPrepConfig:
    """The procedural shapes world written to disk by the prep step of the embedded default."""

    enabled: bool = False
    image_size: int = 64
    num_train: int = 6000
    num_val: int = 256
    max_objects: int = 2
    seed: int = 0


@dataclass
class DataConfig:
    und: list[SourceConfig] = field(default_factory=list)
    gen: list[SourceConfig] = field(default_factory=list)
    text: list[SourceConfig] = field(default_factory=list)
    shapes: ShapesPrepConfig = field(default_factory=ShapesPrepConfig)
    max_seq_len: int = 4096
    max_text_len: int = 512
    """Longest caption / answer / text line in tokens; longer ones are truncated and counted."""
    cfg_drop_prob: float = 0.1
    und_system_prompt: str = OFFICIAL_SYSTEM_PROMPT
    """System prompt of understanding conversations (the official one by default)."""
    cache_latents: bool = True
    cache_repa_features: bool = True
    """With cache_latents, also cache REPA's target (the frozen SigLIP's features of each gen image, fp16) in
    stages where SigLIP is frozen, instead of running SigLIP every step; recomputed when SigLIP's weights change."""
    num_workers: int = 0
    """Worker processes that build the next steps' batches ahead of the training step (a torch DataLoader; pinned
    memory on GPU). The batches are the same as with 0 (built in the training process); resume stays exact."""
    packing: bool = False
    """Pack several understanding/text samples into one row of a micro-batch (rows no longer than its longest
    sample; attention and positions per sample), instead of one right-padded row each: less padding computed.
    The losses are the same per-sample means."""
    max_bad_fraction: float = 0.5
    """Stop with an error when more than this fraction of the first records read are broken."""


# ----------------------------------------------------------------------------- training


@dataclass
class MixturePhase:
    """und:gen:text ratio used until ``until_step`` (exclusive; None = to the end)."""

    und: float = 1.0
    gen: float = 1.0
    text: float = 0.0
    until_step: int | None = None


@dataclass
class StageConfig:
    """One training stage (Table 1 of the paper)."""

    name: str = "stage1"
    policy: Literal["stage1", "stage2", "stage3"] = "stage1"
    """Which parameters train: janusflow.train.stages.FREEZE_POLICIES."""
    max_steps: int = 10000
    lr: float = 1e-4
    warmup_steps: int = 2000
    decay_steps: int = 0
    """Linear LR decay to 0 over the stage's last decay_steps steps (warm-up, constant, decay: "WSD").
    0 = constant after warm-up, as in the paper."""
    batch_size: int = 512
    """Global batch (samples per optimizer step)."""
    micro_batch_size: int = 8
    """Per-rank batch per forward; gradient accumulation fills the global batch."""
    mixture: list[MixturePhase] = field(default_factory=lambda: [MixturePhase(und=50, gen=50, text=0)])
    init_from: str | None = "previous"
    """'previous' = the previous stage's final weights; a path = an exported/official model dir."""
    repa_weight: float | None = None
    """Overrides train.repa.weight for this stage."""


@dataclass
class RepaConfig:
    weight: float = 1.0
    """lambda in L_RF + lambda * L_REPA. 0 turns REPA off (no projector, no SigLIP pass)."""
    layer: int = 6
    """Align the LLM hidden state after this block (1-based, paper: 6 of 24)."""
    hidden_dim: int = 2048


@dataclass
class TimeSamplingConfig:
    kind: Literal["logit_normal", "uniform"] = "logit_normal"
    mean: float = 0.0
    std: float = 1.0


@dataclass
class PrepConfig:
    """Cached preparation steps of the embedded default (train once, reuse)."""

    codec_steps: int = 0
    """Train the shapes AutoencoderKL for this many steps (0 = use the codec as configured)."""
    codec_batch_size: int = 32
    siglip_steps: int = 0
    """Pretrain the small SigLIP with the sigmoid loss on image-caption pairs (0 = skip)."""
    siglip_batch_size: int = 64
    tokenizer_vocab_size: int = 0
    """Train a byte-level BPE tokenizer of this size on the shapes world's text and use it (0 = use ``tokenizer``)."""
    llm_steps: int = 0
    """Pretrain the LLM (next-token loss) on the shapes world's text for this many steps and start stage 1 from it,
    as JanusFlow starts from a pretrained LLM (0 = start from ``llm_path``, or random weights)."""
    llm_batch_size: int = 64


Solver = Literal["euler", "heun", "midpoint", "rk4", "dopri5", "sde"]
"""The samplers of janusflow.sampling.solve."""


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """The WANDB_MODE environment variable, when set, takes precedence."""
    project: str = "janusflow"
    group: str | None = None
    run_name: str | None = None
    log_every: int = 10
    sample_every: int = 0
    """Write a sample grid PNG every N steps (0 = only at the end of each stage)."""
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 30
    sample_cfg: float = 2.0
    sample_solver: Solver = "euler"
    sample_sde_noise: float = 1.0
    """eta of ``sample_solver: sde`` (janusflow.sampling.euler_maruyama)."""
    progress_bar: bool = True


@dataclass
class TrainConfig:
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
    zero_stage: int = 2
    """ZeRO stage for several ranks (or offloading, or bf16); one fp32 rank runs DeepSpeed's plain engine."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON whose values are merged under ours (recipes/deepspeed/zero*.json)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the gradient's total norm to this (0: no clipping)."""
    ema_decay: float = 0.99
    save_every: int = 1000
    keep_checkpoints: int = 2
    repa: RepaConfig = field(default_factory=RepaConfig)
    time_sampling: TimeSamplingConfig = field(default_factory=TimeSamplingConfig)
    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite losses/gradients."""
    activation_checkpointing: bool = False
    """Recompute the LLM's and SigLIP's block activations in the backward pass instead of storing them
    (transformers / timm checkpointing, non-reentrant): much less activation memory, ~1/3 more compute."""
    compile: bool = False
    """torch.compile the generation encoder and decoder (the convolutional parts; the LLM and SigLIP already
    run fused SDPA kernels). The first steps are slow while it compiles; the maths is unchanged."""


@dataclass
class Recipe:
    """A full training recipe: what ``make pretrain RECIPE=name`` runs."""

    name: str = "recipe"
    run_dir: str = "runs/{name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    und_encoder_path: str | None = None
    """A SigLIP state dict (official ``vision_tower.*`` keys) to initialise the understanding tower from."""
    llm_path: str | None = None
    """A local HF LlamaForCausalLM directory (e.g. DeepSeek-LLM-1.3B base) to initialise the LLM from."""
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir.format(name=self.name))


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e308:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating keys and types recursively."""
    data = dict(data)
    if cls is ModelConfig and "preset" in data:
        data = _deep_merge(model_preset_dict(data["preset"], prefix), data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (valid keys for {cls.__name__}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# Sizes, counts and intervals that must be >= 1 (zero fails later in a division or an empty batch).
_POSITIVE = {
    LLMConfig: ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings"),
    UndEncoderConfig: ("image_size", "patch_size", "width", "heads"),
    GenEncoderConfig: ("latent_channels", "channels", "kernel_size", "stride"),
    GenDecoderConfig: ("upsamples",),
    ModelConfig: ("gen_image_size",),
    DataConfig: ("max_seq_len", "max_text_len"),
    TrainConfig: ("save_every", "keep_checkpoints", "max_bad_steps"),
    LoggingConfig: ("log_every", "sample_steps"),
    PrepConfig: ("codec_batch_size", "siglip_batch_size", "llm_batch_size"),
}


def _validate(obj: Any, prefix: str) -> None:
    """Value checks that types alone cannot express."""

    def bad(name: str, msg: str) -> None:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: {msg}")

    for name in _POSITIVE.get(type(obj), ()):
        if getattr(obj, name) < 1:
            bad(name, f"must be >= 1, got {getattr(obj, name)}")
    if isinstance(obj, LLMConfig):
        if obj.hidden_size % obj.num_attention_heads:
            bad("hidden_size", f"{obj.hidden_size} is not divisible by num_attention_heads={obj.num_attention_heads}")
        if obj.num_attention_heads % obj.num_key_value_heads:
            bad("num_key_value_heads", "must divide num_attention_heads")
    if isinstance(obj, UndEncoderConfig) and obj.image_size % obj.patch_size:
        bad("image_size", f"{obj.image_size} is not divisible by patch_size={obj.patch_size}")
    if isinstance(obj, StageConfig):
        if obj.max_steps < 1:
            bad("max_steps", "must be >= 1")
        if obj.batch_size < 1 or obj.micro_batch_size < 1:
            bad("batch_size", "batch sizes must be >= 1")
        if not 0 < obj.lr < math.inf:
            bad("lr", f"must be a number > 0, got {obj.lr}")
        if not 0 <= obj.decay_steps <= obj.max_steps:
            bad("decay_steps", f"must be in [0, max_steps={obj.max_steps}], got {obj.decay_steps}")
        if not obj.mixture:
            bad("mixture", "needs at least one phase")
        for i, ph in enumerate(obj.mixture):
            if min(ph.und, ph.gen, ph.text) < 0 or ph.und + ph.gen + ph.text <= 0:
                bad(f"mixture.{i}", "ratios must be >= 0 and not all zero")
    if isinstance(obj, LoggingConfig) and not obj.sample_sde_noise >= 0:
        bad("sample_sde_noise", f"must be >= 0, got {obj.sample_sde_noise}")
    if isinstance(obj, RepaConfig) and obj.weight < 0:
        bad("weight", "must be >= 0")
    if isinstance(obj, TrainConfig):
        if obj.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", f"{obj.zero_stage} is not one of 0, 1, 2, 3")
        if not 0.0 <= obj.grad_clip < math.inf:
            bad("grad_clip", f"must be a number >= 0 (0: no clipping), got {obj.grad_clip}")
        if not 0.0 <= obj.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1)")
        if len(obj.betas) != 2:
            bad("betas", "needs two values")
    if isinstance(obj, DataConfig) and not 0.0 <= obj.cfg_drop_prob < 1.0:
        bad("cfg_drop_prob", "must be in [0, 1)")
    if isinstance(obj, DataConfig) and obj.num_workers < 0:
        bad("num_workers", f"must be >= 0, got {obj.num_workers}")
    if isinstance(obj, DataConfig) and not 0.0 <= obj.max_bad_fraction <= 1.0:
        bad("max_bad_fraction", f"must be in [0, 1], got {obj.max_bad_fraction}")
    if isinstance(obj, Recipe):
        if not obj.stages:
            bad("stages", "needs at least one stage")
        bpe = obj.prep.tokenizer_vocab_size
        if bpe and not obj.data.shapes.enabled:
            bad("prep.tokenizer_vocab_size", "trains on the shapes world: it needs data.shapes.enabled")
        if 0 < bpe < 256 + 7:
            bad("prep.tokenizer_vocab_size", f"a byte-level BPE needs >= 263 tokens (bytes + specials), got {bpe}")
        if bpe > obj.model.llm.vocab_size:
            bad("prep.tokenizer_vocab_size", f"{bpe} is larger than model.llm.vocab_size={obj.model.llm.vocab_size}")
        if obj.prep.llm_steps < 0:
            bad("prep.llm_steps", f"must be >= 0, got {obj.prep.llm_steps}")
        if obj.prep.llm_steps and not obj.data.shapes.enabled:
            bad("prep.llm_steps", "trains on the shapes world's text: it needs data.shapes.enabled")
        if obj.prep.llm_steps and obj.llm_path:
            bad("prep.llm_steps", f"pretrains the LLM, but llm_path={obj.llm_path!r} gives one already: set one")
        try:
            obj.run_dir.format(name=obj.name)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            bad("run_dir", f"{obj.run_dir!r} is not a valid path template ({{name}} is its only field): {e!r}")


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict/list."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                idx = _list_index(node, part, key)
                node = node[idx]
            elif isinstance(node, dict):
                if part not in node or node[part] is None:
                    node[part] = [] if nxt.isdigit() else {}
                node = node[part]
            else:
                raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is {node!r}, not a mapping or a list")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is {node!r}, not a mapping or a list")
        last = parts[-1]
        try:
            value = _parse_scalar(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: {raw!r} is not a valid YAML value ({_yaml_problem(e)})") from None
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def recipe_path(name_or_path: str) -> Path:
    """``2to8`` -> recipes/2to8.yaml (next to the package); a path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    for root in (Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"):
        if (root / f"{name_or_path}.yaml").exists():
            return root / f"{name_or_path}.yaml"
    raise ConfigError(f"recipe {name_or_path!r} not found (looked for recipes/{name_or_path}.yaml)")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A one-line description of a YAML error: what and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def load_yaml_with_base(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe; a top-level ``base: other.yaml`` key is loaded first and deep-merged under it."""
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path}: its base recipes form a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at top level")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a recipe file name, got {base!r}")
    if base:
        data = _deep_merge(load_yaml_with_base(path.parent / base, (*_seen, path.resolve())), data)
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(name_or_path)
    data = load_yaml_with_base(path)
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)


# ----------------------------------------------------------------------------- presets


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


def model_config(preset: str = "janusflow-1.3b", **overrides: Any) -> ModelConfig:
    """A ModelConfig from a named preset plus keyword overrides (nested dicts merge)."""
    return from_dict(ModelConfig, {"preset": preset, **overrides}, "model")
