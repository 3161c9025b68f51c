"""The training sample, typed: one sample of each kind, the rows a micro-batch collates them into, and the one
step that moves a micro-batch to the device and encodes its images.

    ArSample / GenSample     one tokenised record (the data stream's SampleBuilder makes them)
    ArRows                   understanding + text-only rows of a micro-batch (next-token cross-entropy)
    GenRows                  text-to-image rows (rectified flow; t = 0 is noise, t = 1 is data)
    Batch                    a micro-batch: ``batch.to_device(device, dtype, codec, model_cfg)`` -> ready for the loss

Every field has one name from the data side to the loss. A field that a cache can stand in for is set once:
by the data side from the cache, or else by ``to_device`` from the images (``GenRows.latents``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from janusflow.config import ModelConfig
from janusflow.data.transforms import gen_pixels
from janusflow.models.und_inputs import und_encoder_inputs
from janusflow.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class ArSample:
    """One understanding conversation or text-only line."""

    task: str
    """"und" or "text"."""
    ids: list[int]
    labels: list[int]
    """The target of each position: its own id on answer tokens (and EOS), IGNORE elsewhere."""
    image: torch.Tensor | None = None
    """[3, S, S] the image as the understanding encoder's preprocessing gives it (janusflow.data.transforms)."""


@dataclass
class GenSample:
    """One text-to-image record."""

    prompt_ids: list[int]
    """The generation template without its last tag (the time token takes its place)."""
    drop_prompt: bool
    """Classifier-free guidance dropout: the prompt becomes BOS + masked pads."""
    crop: torch.Tensor | None = None
    """[3, S, S] uint8 generation crop; None when the caches stand in for everything it would give."""
    latent: torch.Tensor | None = None
    """[C, h, w] cached scaled latent of the (centre) crop."""
    repa_target: torch.Tensor | None = None
    """[N, D] cached REPA target: the frozen SigLIP's patch features of the same crop."""


@dataclass
class ArRows:
    """Understanding and text-only rows: R rows of L positions holding n samples (several per row when packed)."""

    input_ids: torch.Tensor
    """[R, L] right-padded with pad_id."""
    labels: torch.Tensor
    """[R, L] the id each position predicts at the next one's place (IGNORE: no loss; each sample's first)."""
    sample_index: torch.Tensor
    """[R, L] the sample (0..n-1) of each position, -1 on padding."""
    is_und: torch.Tensor
    """[n] bool: an understanding sample (else text-only)."""
    image_mask: torch.Tensor
    """[R, L] bool: the positions that receive image embeddings (each <begin_of_image> and its placeholders)."""
    attention_mask: torch.Tensor | None
    """[R, L] 1 on tokens, 0 on padding; None when packed (``position_ids`` restart per sample instead)."""
    position_ids: torch.Tensor | None = None
    """[R, L] packed rows only: positions restarting at 0 for each sample."""
    images: torch.Tensor | None = None
    """[m, 3, S, S] the samples' images in position order, as ``ArSample.image``; None without images."""
    image_latents: torch.Tensor | None = None
    """[m, C, h, w] the VAE understanding kinds (ablations B, C): ``images`` encoded by ``Batch.to_device``."""

    @property
    def encoder_inputs(self) -> torch.Tensor | None:
        """What the model's understanding encoder takes: the latents for the VAE kinds, else the images."""
        return self.image_latents if self.image_latents is not None else self.images

    @classmethod
    def placeholder(cls, device: torch.device) -> ArRows:
        """One masked position: no loss, but every module of the understanding path still runs (ZeRO)."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        return cls(ids, ids - 100, ids, torch.zeros(1, dtype=torch.bool, device=device),
                   torch.zeros_like(ids, dtype=torch.bool), torch.ones_like(ids))


@dataclass
class GenRows:
    """Text-to-image rows of one micro-batch."""

    t: torch.Tensor
    """[B] float32 training times in (0, 1)."""
    noise_seed: int
    """x0 ~ N(0, I) is drawn from this seed (janusflow.flow.noisy_latents)."""
    prompt_ids: torch.Tensor | None = None
    """[B, P] left-padded prompts (``GenSample.prompt_ids``; a dropped prompt is BOS + pads). None when packed:
    the prompts are then tokens of the packed rows (``Batch.ar``)."""
    prompt_mask: torch.Tensor | None = None
    """[B, P] 1 on visible prompt tokens."""
    latents: torch.Tensor | None = None
    """[B, C, h, w] x1, the scaled codec latents: from the latent cache, else encoded from ``crops``."""
    crops: torch.Tensor | None = None
    """[B, 3, S, S] uint8 generation crops, when a cache does not stand in for them."""
    repa_targets: torch.Tensor | None = None
    """[B, N, D] cached REPA targets; None: computed from ``crops`` by the live SigLIP (or REPA is off)."""

    @classmethod
    def placeholder(cls, cfg: ModelConfig, device: torch.device, repa_cached: bool, repa_patches: int) -> GenRows:
        """One all-zero row for a micro-batch without generation samples (every module still runs: ZeRO)."""
        gen, und = cfg.gen_encoder, cfg.und_encoder
        side = 2 * gen.stride
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        rows = cls(torch.zeros(1, device=device), 0, ids, torch.ones_like(ids),
                   latents=torch.zeros(1, gen.latent_channels, side, side, device=device))
        if repa_cached:
            rows.repa_targets = torch.zeros(1, repa_patches, und.width, device=device)
        else:
            rows.crops = torch.zeros(1, 3, und.image_size, und.image_size, dtype=torch.uint8, device=device)
        return rows


@dataclass
class PackedLayout:
    """Where the samples of packed rows are (data.pack_length): ``Batch.ar`` then holds every row's tokens (the
    generation prompts among them) and ``Batch.gen`` the generation samples' flow inputs."""

    segments: torch.Tensor
    """[R, L] the packed sample of each position (unique in the micro-batch), -1 on padding: attention blocks."""
    gen_slots: torch.Tensor | None = None
    """[G, 1 + N] flat positions (row * L + column) of each generation sample's time token and image tokens, in the
    order of ``Batch.gen``'s rows."""


@dataclass
class Batch:
    """One micro-batch of ``size`` samples; the mixture's shares of it weight the objectives."""

    size: int
    ar: ArRows | None = None
    gen: GenRows | None = None
    counts: dict = field(default_factory=dict)
    """Samples per task."""
    layout: PackedLayout | None = None
    """Set when the samples are packed into rows of data.pack_length tokens."""

    def _map(self, fn) -> Batch:
        def apply(rows):
            if rows is None:
                return None
            return dataclasses.replace(rows, **{f.name: fn(f.name, getattr(rows, f.name))
                                                for f in dataclasses.fields(rows)
                                                if isinstance(getattr(rows, f.name), torch.Tensor)})

        return Batch(self.size, apply(self.ar), apply(self.gen), self.counts, apply(self.layout))

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader's pin-memory thread) for asynchronous host-to-GPU copies."""
        return self._map(lambda _name, t: t.pin_memory())

    def to_device(self, device: torch.device, dtype: torch.dtype, codec=None, model_cfg: ModelConfig | None = None
                  ) -> Batch:
        """Move to ``device`` and encode images with the codec: gen latents the cache lacked, and the understanding
        images of the VAE kinds. Only the model's image inputs take ``dtype``; ids, t, latents and REPA targets
        stay as they are (fp32), so the flow's noise, z_t and target are built in fp32."""
        model_inputs = ("images",)

        def move(name: str, t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype if name in model_inputs else None, non_blocking=True)

        out = self._map(move)
        if out.gen is not None and out.gen.latents is None:
            out.gen.latents = codec.encode(gen_pixels(out.gen.crops)).float()
        if out.ar is not None and out.ar.images is not None and model_cfg is not None and model_cfg.und_uses_vae:
            out.ar.image_latents = und_encoder_inputs(self.ar.images, model_cfg, codec).to(device, dtype)
        return out


# ----------------------------------------------------------------------------- collation


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, rows no longer than ``width``."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def collate_ar(samples: list[ArSample], tok: Tokenizer) -> ArRows:
    """Right-padded rows, one sample each (packed rows: ``collate_packed``)."""
    width = max(len(s.ids) for s in samples)
    shape = (len(samples), width)
    ids, labels = torch.full(shape, tok.pad_id), torch.full(shape, IGNORE)
    mask, index = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1)
    for r, s in enumerate(samples):
        n = len(s.ids)
        ids[r, :n], labels[r, :n] = torch.tensor(s.ids), torch.tensor(s.labels)
        labels[r, 0] = IGNORE
        mask[r, :n], index[r, :n] = 1, r
    images = [s.image for s in samples if s.image is not None]
    return ArRows(ids, labels, index, torch.tensor([s.task == "und" for s in samples]),
                  image_mask=(ids == tok.image_id) | (ids == tok.boi_id), attention_mask=mask,
                  images=torch.stack(images) if images else None)


def collate_gen(samples: list[GenSample], tok: Tokenizer, t: torch.Tensor, noise_seed: int) -> GenRows:
    """Left-padded prompts; a dropped prompt keeps BOS, the rest of it is pad and masked, exactly like the
    unconditional rows at sampling time. A cache's values are used only when every sample has them."""
    width = max(len(s.prompt_ids) for s in samples)
    ids = torch.full((len(samples), width), tok.pad_id)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.prompt_ids)
        ids[i, width - n:] = torch.tensor(s.prompt_ids)
        mask[i, width - n:] = 1
        if s.drop_prompt:
            ids[i, width - n + 1:] = tok.pad_id
            mask[i, width - n + 1:] = 0

    def stacked(name: str) -> torch.Tensor | None:
        values = [getattr(s, name) for s in samples]
        return torch.stack(values) if all(v is not None for v in values) else None

    latents, targets = stacked("latent"), stacked("repa_target")
    crops = stacked("crop") if latents is None or targets is None else None  # to encode, or for a live REPA target
    return GenRows(t, noise_seed, ids, mask, latents=latents, crops=crops, repa_targets=targets)


def sample_length(sample: ArSample | GenSample, gen_tokens: int) -> int:
    """Positions a sample takes in a packed row: its tokens, or a generation sample's prompt (BOS alone when
    dropped), time token and ``gen_tokens`` image tokens."""
    if isinstance(sample, GenSample):
        return (1 if sample.drop_prompt else len(sample.prompt_ids)) + 1 + gen_tokens
    return len(sample.ids)


@dataclass
class _PackedRowsBuilder:
    """Fills the tensors of packed rows one sample at a time (``collate_packed``)."""

    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    index: torch.Tensor
    gen_tokens: int
    gen_slots: dict = field(default_factory=dict)
    images: list = field(default_factory=list)

    def place_ar(self, s: ArSample, row: int, at: int, segment: int, ar_index: int) -> None:
        n = len(s.ids)
        self.ids[row, at:at + n], self.labels[row, at:at + n] = torch.tensor(s.ids), torch.tensor(s.labels)
        self.labels[row, at] = IGNORE
        self.positions[row, at:at + n] = torch.arange(n)
        self.segments[row, at:at + n], self.index[row, at:at + n] = segment, ar_index
        if s.image is not None:
            self.images.append(s.image)

    def place_gen(self, s: GenSample, row: int, at: int, segment: int, gen_index: int, bos_id: int) -> None:
        """The prompt (a dropped one: BOS, then a gap of its length in the positions, so that the time and image
        tokens sit where they do behind the masked pads of an unpacked row), then the time and image slots."""
        prompt = [bos_id] if s.drop_prompt else s.prompt_ids
        n, total = len(prompt), len(prompt) + 1 + self.gen_tokens
        self.ids[row, at:at + n] = torch.tensor(prompt)
        self.positions[row, at:at + n] = torch.arange(n)
        self.positions[row, at + n:at + total] = len(s.prompt_ids) + torch.arange(1 + self.gen_tokens)
        self.segments[row, at:at + total] = segment
        width = self.ids.shape[1]
        self.gen_slots[gen_index] = row * width + at + n + torch.arange(1 + self.gen_tokens)


def collate_packed(samples: list[ArSample | GenSample], rows: list[list[int]], width: int, tok: Tokenizer,
                   gen_tokens: int, t: torch.Tensor | None, noise_seed: int) -> tuple[ArRows, GenRows | None,
                                                                                     PackedLayout]:
    """Samples of every task packed into rows of ``width`` tokens (``rows``: the sample indices of each row, in
    order). The understanding and text samples' CE comes from ``ArRows`` (``sample_index`` counts them alone); the
    generation samples, in their order in ``samples``, get ``GenRows`` (t and noise) and their slots."""
    shape = (len(rows), width)
    none = torch.full(shape, -1)
    b = _PackedRowsBuilder(torch.full(shape, tok.pad_id), torch.full(shape, IGNORE),
                           torch.zeros(shape, dtype=torch.long), none, none.clone(), gen_tokens)
    ar_index = {i: k for k, i in enumerate(i for i, s in enumerate(samples) if isinstance(s, ArSample))}
    gen_index = {i: k for k, i in enumerate(i for i, s in enumerate(samples) if isinstance(s, GenSample))}
    segment = 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = samples[i]
            if isinstance(s, GenSample):
                b.place_gen(s, r, at, segment, gen_index[i], tok.bos_id)
            else:
                b.place_ar(s, r, at, segment, ar_index[i])
            at, segment = at + sample_length(s, gen_tokens), segment + 1
    ar = ArRows(b.ids, b.labels, b.index, torch.tensor([samples[i].task == "und" for i in ar_index]),
                image_mask=(b.ids == tok.image_id) | (b.ids == tok.boi_id), attention_mask=None,
                position_ids=b.positions, images=torch.stack(b.images) if b.images else None)
    gens = [samples[i] for i in gen_index]
    gen = None
    if gens:
        gen = collate_gen(gens, tok, t, noise_seed)
        gen.prompt_ids = gen.prompt_mask = None
    slots = torch.stack([b.gen_slots[k] for k in range(len(gens))]) if gens else None
    return ar, gen, PackedLayout(b.segments, slots)
