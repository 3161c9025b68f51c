"""Inference pipeline: a loaded model directory that draws images from prompts and answers questions about images.

The model directory is an exported one (``janusflow.export``), a training run with an ``export/``
folder, or an official JanusFlow-1.3B download (whose SDXL-VAE is a separate directory: ``vae_dir``).

    pipe = load_pipeline("runs/2to8/export")
    images = pipe.generate(["a red circle above a blue square"], seed=0)     # list of PIL images
    print(pipe.answer(images[0], "What shapes are in the image?"))

Image ``i`` of a ``generate`` call starts from noise drawn from (seed, i) alone, so a seed reproduces
its images whatever the batch size and the device.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, UnidentifiedImageError

from janusflow.data.transforms import und_pixels
from janusflow.export import read_processor_config
from janusflow.models.codec import LatentCodec
from janusflow.models.janusflow import JanusFlow
from janusflow.models.official_format import read_model_config
from janusflow.models.und_inputs import num_und_tokens, und_encoder_inputs
from janusflow.sampling import FULL_INTERVAL, SOLVERS, check_sampler_options, generate_text, sample_latents, to_uint8
from janusflow.tokenizer import (
    TOKENIZER_FILE,
    Tokenizer,
    check_vocab,
    expand_image_tokens,
    gen_prompt,
    image_seq_mask,
    load_tokenizer,
    und_prompt,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PipelineError(ValueError):
    """Bad input to the pipeline (missing files, a prompt too long, an unreadable image): the message is for users."""


# ----------------------------------------------------------------------------- loading


def resolve_model_dir(model_dir: str | Path) -> Path:
    """The directory holding config.json: ``model_dir`` itself or a training run's ``export/``."""
    path = Path(model_dir)
    if not path.is_dir():
        raise PipelineError(f"model directory {path} does not exist")
    if not (path / "config.json").exists() and (path / "export" / "config.json").exists():
        return path / "export"
    if not (path / "config.json").exists():
        raise PipelineError(f"{path} has no config.json: pass an exported model directory "
                            "(e.g. runs/NAME/export) or an official JanusFlow download")
    return path


def resolve_vae_dir(model_dir: Path, vae_dir: str | Path | None) -> Path:
    path = Path(vae_dir) if vae_dir is not None else model_dir / "vae"
    if not (path / "config.json").exists():
        where = f"--vae {path} is not" if vae_dir is not None else f"no VAE found: {path} is not"
        raise PipelineError(f"{where} a diffusers AutoencoderKL directory; pass --vae DIR "
                            "(e.g. a local copy of stabilityai/sdxl-vae)")
    return path


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA (as the official demo runs), float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PipelineError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_pipeline(model_dir: str | Path, vae_dir: str | Path | None = None, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype | None = None, load_vae: bool = True) -> Pipeline:
    """Load model, tokenizer, prompt settings and (unless ``load_vae=False``, e.g. for chat only) the VAE.

    A model whose understanding encoder reads VAE latents (``und_encoder_kind`` shared_gen / separate_gen)
    always gets its VAE."""
    path = resolve_model_dir(model_dir)
    if not (path / TOKENIZER_FILE).exists() and not (path / "tokenizer_config.json").exists():
        raise PipelineError(f"{path} has no tokenizer ({TOKENIZER_FILE} or HF tokenizer files)")
    dtype = parse_dtype(dtype, device)
    codec = None
    if load_vae or read_model_config(path).und_uses_vae:
        vae = read_vae(resolve_vae_dir(path, vae_dir))
        # The SDXL-VAE overflows in float16 (the official demo notes it); decode it in float32 then.
        codec = LatentCodec(vae).to(device, torch.float32 if dtype == torch.float16 else dtype)
    model = JanusFlow.from_pretrained(path, dtype=dtype, device=device).eval()
    if codec is not None and codec.latent_channels != model.config.gen_encoder.latent_channels:
        raise PipelineError(f"the VAE has {codec.latent_channels} latent channels but the model expects "
                            f"{model.config.gen_encoder.latent_channels}: pass the VAE it was trained with (--vae)")
    tokenizer = load_tokenizer(path)
    check_vocab(tokenizer, model.config.llm.vocab_size, f"in {path}")
    system_prompt = read_processor_config(path)["system_prompt"]
    return Pipeline(model, codec, tokenizer, system_prompt)


def read_vae(path: Path) -> AutoencoderKL:
    from safetensors import SafetensorError

    try:
        return AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False)
    except (OSError, ValueError, SafetensorError) as e:  # a broken config.json or weight file
        raise PipelineError(f"cannot load the VAE in {path}: {e}") from None


# ----------------------------------------------------------------------------- helpers


def image_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """Starting noise [C, H, W] of image ``index`` under ``seed``: a function of the pair only (CPU RNG)."""
    return torch.randn(tuple(shape), generator=image_generator(seed, index))


def image_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator of image ``index`` under ``seed``: stream 0 draws its starting noise, 1 its SDE increments."""
    if seed < 0:
        raise PipelineError(f"seed must be >= 0, got {seed}")
    words = [seed, index] if stream == 0 else [seed, index, stream]
    state = np.random.SeedSequence(words).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, L] left-padded with pad_id, attention mask [B, L])."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from disk, or a PipelineError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        reason = e.strerror if getattr(e, "strerror", None) else "not a readable image"
        raise PipelineError(f"cannot read image {path}: {reason}") from None


def slug(text: str, max_len: int = 48) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-") or "prompt"


class PrintStreamer:
    """Prints an answer as ``generate`` produces it (the transformers streamer protocol: ``put`` / ``end``).

    The first ``put`` is the prompt and is skipped; the text is decoded from all tokens so far and
    only the new part is printed, holding back an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        print(file=self.file, flush=True)
        self.tokens, self.printed, self.prompt_seen = [], 0, False

    def _emit(self, text: str) -> None:
        if len(text) > self.printed:
            print(text[self.printed:], end="", file=self.file, flush=True)
            self.printed = len(text)


# ----------------------------------------------------------------------------- pipeline


@dataclass
class Pipeline:
    """A model with its codec (None when loaded for chat only), tokenizer and system prompt."""

    model: JanusFlow
    codec: LatentCodec | None
    tokenizer: Tokenizer
    system_prompt: str
    last_nfe: int = 0
    """Velocity evaluations (each one a CFG-doubled batch) of the last ``generate``, summed over batches."""
    last_num_batches: int = 0

    @property
    def device(self) -> torch.device:
        return self.model.beg_of_und_embed.device

    @property
    def max_context(self) -> int:
        return self.model.config.llm.max_position_embeddings

    def latent_shape(self) -> tuple[int, int, int]:
        return self.codec.latent_shape(self.model.config.gen_image_size)

    def num_und_tokens(self) -> int:
        """Image placeholders per understanding image."""
        cfg = self.model.config
        return num_und_tokens(cfg, self.latent_shape()[1:] if cfg.und_uses_vae else None)

    def und_encoder_inputs(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the model's understanding input on its device (janusflow.models.und_inputs)."""
        pixels = torch.stack([und_pixels(im, self.model.config) for im in images])
        pixels = und_encoder_inputs(pixels.to(self.device), self.model.config, self.codec)
        return pixels.to(self.device, self.model.dtype_for_llm)

    def gen_ids(self, prompt: str) -> list[int]:
        """Token ids of a text-to-image prompt, checked against the context length."""
        ids = self.tokenizer.encode(gen_prompt(prompt))
        n_image = self.model.num_gen_tokens(self.latent_shape()[1:])
        if len(ids) + n_image > self.max_context:
            short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            raise PipelineError(f"prompt {short!r} is {len(ids)} tokens; with {n_image} image tokens it exceeds "
                                f"the context of {self.max_context} tokens")
        return ids

    def generate(self, prompts: Sequence[str], *, seed: int = 0, steps: int = 30, cfg_weight: float = 2.0,
                 solver: str = "euler", batch_size: int = 8, sde_noise: float = 1.0,
                 progress: Callable[[int, int], None] | None = None, time_shift: float = 1.0,
                 cfg_interval: tuple[float, float] = FULL_INTERVAL,
                 image_indices: Sequence[int] | None = None, compile: bool = False) -> list[Image.Image]:
        """One image per prompt (repeat a prompt for several). ``progress(done, total)`` counts solver steps.

        ``solver="sde"`` draws image i's increments from (seed, i) too, so its images also do not depend on
        the batch size; ``sde_noise`` is its eta (janusflow.sampling.euler_maruyama). ``time_shift`` and
        ``cfg_interval`` are the sampler options of janusflow.sampling (1.0 and (0, 1): the official sampler).
        ``image_indices``: the noise index of each image (default 0, 1, ...), so that a benchmark can draw
        prompt p's images from the same noise whichever prompts share its call. ``compile``: the sampling step
        through torch.compile (CUDA graphs on a GPU; the same images, the first batch compiles)."""
        if self.codec is None:
            raise PipelineError("this pipeline was loaded without a VAE; pass --vae DIR")
        if solver not in SOLVERS:
            raise PipelineError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
        if steps < 1 or batch_size < 1:
            raise PipelineError("steps and batch_size must be >= 1")
        if not (math.isfinite(sde_noise) and sde_noise >= 0):
            raise PipelineError(f"sde_noise must be a number >= 0, got {sde_noise}")
        try:
            check_sampler_options(solver, time_shift, cfg_interval)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        indices = list(range(len(prompts)) if image_indices is None else image_indices)
        if len(indices) != len(prompts):
            raise PipelineError(f"{len(indices)} image indices for {len(prompts)} prompts")
        if not prompts:
            return []
        ids = [self.gen_ids(p) for p in prompts]
        noise = torch.stack([image_noise(seed, i, self.latent_shape()) for i in indices])
        starts = range(0, len(prompts), batch_size)
        total = len(starts) * steps
        images: list[Image.Image] = []
        self.last_nfe, self.last_num_batches = 0, len(starts)
        for b, start in enumerate(starts):
            done = b * steps
            step_progress = (lambda k, _n, done=done: progress(done + k, total)) if progress else None
            stop = min(start + batch_size, len(prompts))
            gens = [image_generator(seed, i, stream=1) for i in indices[start:stop]] if solver == "sde" else []
            step_noise = (lambda _k, gens=gens: torch.stack([torch.randn(self.latent_shape(), generator=g)
                                                               for g in gens])) if gens else None
            options = dict(sde_noise=sde_noise, step_noise=step_noise, time_shift=time_shift, cfg_interval=cfg_interval,
                           compile=compile)
            z, nfe = self._sample(ids[start:stop], noise[start:stop], steps, cfg_weight, solver, step_progress, options)
            self.last_nfe += nfe
            images += [Image.fromarray(x) for x in to_uint8(self.codec.decode(z)).numpy()]
            if progress:
                progress(done + steps, total)
        return images

    def _sample(self, ids: list[list[int]], noise: torch.Tensor, steps: int, cfg_weight: float, solver: str,
                progress: Callable | None, options: dict) -> tuple[torch.Tensor, int]:
        """``options``: the keyword arguments of sample_latents for the SDE and the sampler options."""
        input_ids, mask = left_pad(ids, self.tokenizer.pad_id)
        return sample_latents(self.model, input_ids.to(self.device), noise.to(self.device), steps=steps,
                              cfg_weight=cfg_weight, pad_id=self.tokenizer.pad_id, attention_mask=mask.to(self.device),
                              solver=solver, progress=progress, return_nfe=True, **options)

    @torch.no_grad()
    def answer(self, image: Image.Image, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, streamer=None, seed: int | None = None) -> str:
        """The model's answer to ``question`` about ``image`` (greedy at temperature 0)."""
        tok, model = self.tokenizer, self.model
        ids = tok.encode(und_prompt(question, self.system_prompt))
        ids = torch.tensor([expand_image_tokens(ids, tok, self.num_und_tokens())], device=self.device)
        if ids.shape[1] + max_new_tokens > self.max_context:
            raise PipelineError(f"the question is {ids.shape[1]} tokens with the image; with max_new_tokens="
                                f"{max_new_tokens} it exceeds the context of {self.max_context} tokens")
        pixels = self.und_encoder_inputs([image])
        embeds = model.und_inputs_embeds(ids, pixels, image_seq_mask(ids, tok))
        out = generate_text(model, embeds, torch.ones_like(ids), eos_id=tok.eos_id, pad_id=tok.pad_id,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            streamer=streamer, generator_seed=seed)
        return tok.decode(out[0].tolist(), skip_special_tokens=True).strip()
