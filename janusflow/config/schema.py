"""The recipe schema: typed dataclasses for the model, codec, data, training, stages and logging.

Defaults are the official JanusFlow values (paper Table 1, the official code); recipes state only what differs.
Each class says what its values must satisfy beyond their types in ``problems()`` (field, message) and lists
its sizes that must be >= 1 in ``POSITIVE``; ``janusflow.config.loader`` reports the first problem under its
dotted key before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from janusflow.tokenizer import OFFICIAL_SYSTEM_PROMPT

Problems = Iterator[tuple[str, str]]


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the offending key."""


def problems_of(obj: Any) -> Problems:
    """(field, message) for every value of ``obj`` that breaks its class's rules."""
    for name in getattr(obj, "POSITIVE", ()):
        if getattr(obj, name) < 1:
            yield name, f"must be >= 1, got {getattr(obj, name)}"
    check = getattr(obj, "problems", None)
    if check is not None:
        yield from check()


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------- model


@dataclass
class LLMConfig:
    """The decoder-only LLM (a transformers LlamaForCausalLM)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    """DeepSeek-LLM-1.3B's MLP width (JanusFlow's base; 5504 is deepseek-coder-1.3b's)."""
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 16384
    """DeepSeek-LLM-1.3B's; the paper trains on sequences of 4,096 (``data.max_seq_len``)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa, eager or flash_attention_2."""

    POSITIVE: ClassVar = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                          "num_key_value_heads", "max_position_embeddings")

    def problems(self) -> Problems:
        if self.hidden_size % self.num_attention_heads:
            heads = self.num_attention_heads
            yield "hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads={heads}"
        if self.num_attention_heads % self.num_key_value_heads:
            yield "num_key_value_heads", "must divide num_attention_heads"


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

    POSITIVE: ClassVar = ("image_size", "patch_size", "width", "heads")

    def problems(self) -> Problems:
        if self.image_size % self.patch_size:
            yield "image_size", f"{self.image_size} is not divisible by patch_size={self.patch_size}"


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

    POSITIVE: ClassVar = ("latent_channels", "channels", "kernel_size", "stride")


@dataclass
class GenDecoderConfig:
    """ShallowUViTDecoder: ConvNeXt blocks on [llm features, skip] then pixel-shuffle."""

    upsamples: int = 1
    num_blocks: int = 2

    POSITIVE: ClassVar = ("upsamples",)


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

    POSITIVE: ClassVar = ("gen_image_size",)

    @property
    def und_uses_vae(self) -> bool:
        """Whether understanding images go through the VAE (ablations B and C) instead of SigLIP."""
        return self.und_encoder_kind != "siglip"


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
    template: Literal["auto", "sft", "raw", "caption"] = "auto"
    """How a record becomes a sequence (paper §4.2). Generation: ``sft`` "User: {caption}\\n\\nAssistant:<image>"
    (the inference template; auto), ``raw`` "{caption}<image>" (the paper's stages 1-2). Image-caption data as
    understanding: ``caption`` "<image>Generate the caption of this picture. {caption}" (auto). Conversations and
    text are read as they are."""


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
    """Longest caption or answer in tokens; longer ones are truncated and counted. Text-only lines longer than the
    context (max_seq_len) are cut into chunks of the context, each a sample (counted as ``text_chunked``)."""
    cfg_drop_prob: float = 0.1
    und_system_prompt: str = OFFICIAL_SYSTEM_PROMPT
    """System prompt of understanding conversations (the official one by default)."""
    cache_latents: bool = True
    cache_repa_features: bool = True
    """With cache_latents, also cache REPA's target (the frozen SigLIP's features of each gen image, fp16) in
    stages where SigLIP is frozen, instead of running SigLIP every step; recomputed when SigLIP's weights change."""
    repa_cache_max_gb: float = 64.0
    """The REPA target cache is left off (SigLIP runs live, as in stage 3) when it would take more disk than this:
    at 384 px a crop's target is 576 x 1024 fp16 = 1.2 MB, so 10M images make 11 TiB."""
    num_workers: int = 0
    """Worker processes that build the next steps' batches ahead of the training step (a torch DataLoader; pinned
    memory on GPU). The batches are the same as with 0 (built in the training process); resume stays exact."""
    pack_length: int = 0
    """0: one sample per row (padded). N > 0: samples of all three tasks packed into rows of N tokens, as the paper
    ("multiple sequences are packed to form a single sequence of length 4,096"), each attending only to itself
    with its own positions; the losses are the same per-sample means. ``stages.N.batch_unit`` says whether the
    batch sizes count samples or packed rows."""
    latent_crops: int = 1
    """Random square crops cached per generation image (the paper's crop survives the latent cache: each use
    draws one of K crops, each crop a deterministic function of (seed, record, k)); 1 = the centre crop only.
    K multiplies the cache's encode time and size."""
    max_bad_fraction: float = 0.5
    """Stop with an error when more than this fraction of the first records read are broken."""

    POSITIVE: ClassVar = ("max_seq_len", "max_text_len", "latent_crops")

    def problems(self) -> Problems:
        if self.pack_length < 0:
            yield "pack_length", f"must be >= 0 (0: no packing), got {self.pack_length}"
        if not self.repa_cache_max_gb >= 0:
            yield "repa_cache_max_gb", f"must be >= 0, got {self.repa_cache_max_gb}"
        if not 0.0 <= self.cfg_drop_prob < 1.0:
            yield "cfg_drop_prob", "must be in [0, 1)"
        if self.num_workers < 0:
            yield "num_workers", f"must be >= 0, got {self.num_workers}"
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            yield "max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}"


# ----------------------------------------------------------------------------- training


@dataclass
class MixturePhase:
    """und:gen:text ratio used until ``until_step`` (exclusive; None = to the end)."""

    und: float = 1.0
    gen: float = 1.0
    text: float = 0.0
    until_step: int | None = None


@dataclass
class StageData:
    """A stage's own sources per task (None: the recipe's ``data`` sources of that task)."""

    und: list[SourceConfig] | None = None
    gen: list[SourceConfig] | None = None
    text: list[SourceConfig] | None = None


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
    data: StageData | None = None
    """This stage's own sources (e.g. instruction data for SFT); a task left out keeps the recipe's ``data``."""
    batch_unit: Literal["samples", "sequences"] = "samples"
    """What batch_size and micro_batch_size count: samples, or packed rows of data.pack_length tokens (the
    paper's reading: batch 512 x 4,096 tokens); "sequences" needs data.pack_length > 0."""
    init_from: str | None = "previous"
    """'previous' = the previous stage's final weights; a path = an exported/official model dir."""
    repa_weight: float | None = None
    """Overrides train.repa.weight for this stage."""
    repa_warmup_steps: int = 0
    """For the first N steps REPA trains only its projector (the LLM gets no REPA gradient): for a stage whose
    projector starts fresh on a trained LLM, e.g. fine-tuning the release, which ships without one."""

    def problems(self) -> Problems:
        if self.max_steps < 1:
            yield "max_steps", "must be >= 1"
        if self.batch_size < 1 or self.micro_batch_size < 1:
            yield "batch_size", "batch sizes must be >= 1"
        if not 0 < self.lr < math.inf:
            yield "lr", f"must be a number > 0, got {self.lr}"
        if not 0 <= self.decay_steps <= self.max_steps:
            yield "decay_steps", f"must be in [0, max_steps={self.max_steps}], got {self.decay_steps}"
        if not 0 <= self.repa_warmup_steps <= self.max_steps:
            yield "repa_warmup_steps", f"must be in [0, max_steps={self.max_steps}], got {self.repa_warmup_steps}"
        if not self.mixture:
            yield "mixture", "needs at least one phase"
        for i, ph in enumerate(self.mixture):
            if min(ph.und, ph.gen, ph.text) < 0 or ph.und + ph.gen + ph.text <= 0:
                yield f"mixture.{i}", "ratios must be >= 0 and not all zero"


@dataclass
class RepaConfig:
    weight: float = 1.0
    """lambda in L_RF + lambda * L_REPA. 0 turns REPA off (no projector, no SigLIP pass)."""
    layer: int = 6
    """Align the LLM hidden state after this block (1-based, paper: 6 of 24)."""
    hidden_dim: int = 2048

    def problems(self) -> Problems:
        if self.weight < 0:
            yield "weight", "must be >= 0"


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

    POSITIVE: ClassVar = ("codec_batch_size", "siglip_batch_size", "llm_batch_size")

    def recipe_problems(self, recipe: Recipe) -> Problems:
        """The prep steps' needs of the rest of the recipe (keys relative to the recipe)."""
        bpe, shapes = self.tokenizer_vocab_size, recipe.data.shapes.enabled
        if bpe and not shapes:
            yield "prep.tokenizer_vocab_size", "trains on the shapes world: it needs data.shapes.enabled"
        if 0 < bpe < 256 + 7:
            yield "prep.tokenizer_vocab_size", f"a byte-level BPE needs >= 263 tokens (bytes + specials), got {bpe}"
        if bpe > recipe.model.llm.vocab_size:
            vocab = recipe.model.llm.vocab_size
            yield "prep.tokenizer_vocab_size", f"{bpe} is larger than model.llm.vocab_size={vocab}"
        if self.llm_steps < 0:
            yield "prep.llm_steps", f"must be >= 0, got {self.llm_steps}"
        if self.llm_steps and not shapes:
            yield "prep.llm_steps", "trains on the shapes world's text: it needs data.shapes.enabled"
        if self.llm_steps and recipe.llm_path:
            yield "prep.llm_steps", f"pretrains the LLM, but llm_path={recipe.llm_path!r} gives one already: set one"


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
    sample_seed: int = 0
    """The grids' seed: ``tools/sample.py --seed S`` draws the same images from the same weights."""
    sample_steps: int = 30
    sample_cfg: float = 2.0
    sample_solver: Solver = "euler"
    sample_sde_noise: float = 1.0
    """eta of ``sample_solver: sde`` (janusflow.sampling.euler_maruyama)."""
    progress_bar: bool = True

    POSITIVE: ClassVar = ("log_every", "sample_steps")

    def problems(self) -> Problems:
        if not self.sample_sde_noise >= 0:
            yield "sample_sde_noise", f"must be >= 0, got {self.sample_sde_noise}"


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

    POSITIVE: ClassVar = ("save_every", "keep_checkpoints", "max_bad_steps")

    def problems(self) -> Problems:
        if self.zero_stage not in (0, 1, 2, 3):
            yield "zero_stage", f"{self.zero_stage} is not one of 0, 1, 2, 3"
        if not 0.0 <= self.grad_clip < math.inf:
            yield "grad_clip", f"must be a number >= 0 (0: no clipping), got {self.grad_clip}"
        if not 0.0 <= self.ema_decay < 1.0:
            yield "ema_decay", "must be in [0, 1)"
        if len(self.betas) != 2:
            yield "betas", "needs two values"


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

    def problems(self) -> Problems:
        if not self.stages:
            yield "stages", "needs at least one stage"
        for i, stage in enumerate(self.stages):
            if stage.batch_unit == "sequences" and not self.data.pack_length:
                yield f"stages.{i}.batch_unit", "sequences counts packed rows: it needs data.pack_length > 0"
        if self.data.pack_length and self.data.pack_length > self.model.llm.max_position_embeddings:
            yield "data.pack_length", (f"{self.data.pack_length} exceeds model.llm.max_position_embeddings="
                                       f"{self.model.llm.max_position_embeddings}")
        yield from self.prep.recipe_problems(self)
        try:
            self.run_dir.format(name=self.name)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            yield "run_dir", f"{self.run_dir!r} is not a valid path template ({{name}} is its only field): {e!r}"


