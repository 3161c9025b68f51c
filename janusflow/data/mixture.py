"""The training data stream: und:gen:text ratio schedules, tokenised samples and batches.

Every global batch is a pure function of (seed, step): the task of each slot follows the stage's
ratio schedule, records are drawn at random from the task's sources, and the rectified-flow noise
and times come from the same seeded generator. Resuming at step s therefore reproduces the data
exactly, and any number of ranks sees the same global batch (rank r takes micro-batches r, r + W, ...).

    stream = MixtureStream(sources, builder, schedule, seed=0)
    for micro in stream.micro_batches(step, batch_size=16, micro_batch_size=4, rank=0, world=1): ...
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from janusflow.config import DataConfig, MixturePhase, ModelConfig, TimeSamplingConfig
from janusflow.data.sources import (
    CaptionRecord,
    ConversationRecord,
    TextRecord,
    gen_transform,
    und_transform,
)
from janusflow.flow import sample_t
from janusflow.tokenizer import EOS, IMAGE, Tokenizer, expand_image_tokens, sft_prompt

log = logging.getLogger(__name__)
TASKS = ("gen", "und", "text")
IGNORE = -100


class DataError(RuntimeError):
    """A dataset is unusable (e.g. mostly broken records)."""


class MixtureSchedule:
    """und:gen:text ratios by step, from a stage's list of MixturePhase."""

    def __init__(self, phases: list[MixturePhase]):
        self.phases = phases

    def ratios(self, step: int) -> dict[str, float]:
        phase = next((p for p in self.phases if p.until_step is None or step < p.until_step), self.phases[-1])
        total = phase.und + phase.gen + phase.text
        return {"gen": phase.gen / total, "und": phase.und / total, "text": phase.text / total}

    def composition(self, step: int, batch_size: int, rng: random.Random) -> list[str]:
        """Task per slot, grouped gen/und/text. Counts follow the ratio; the fractional remainder
        is assigned at random so that the ratio also holds on average for small batches."""
        ratios = self.ratios(step)
        exact = {k: ratios[k] * batch_size for k in TASKS}
        counts = {k: int(exact[k]) for k in TASKS}
        while sum(counts.values()) < batch_size:
            rest = {k: exact[k] - counts[k] for k in TASKS if exact[k] - counts[k] > 0}
            pick = rng.choices(list(rest), weights=list(rest.values()))[0]
            counts[pick] += 1
            exact[pick] = counts[pick]
        return [k for k in TASKS for _ in range(counts[k])]


@dataclass
class Batch:
    """One micro-batch. ``ar`` holds understanding + text rows (cross-entropy), ``gen`` the RF rows."""

    size: int
    ar: dict | None = None
    gen: dict | None = None
    counts: dict = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        def move(d):
            if d is None:
                return None
            return {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))
                    if isinstance(v, torch.Tensor) else v for k, v in d.items()}

        return Batch(self.size, move(self.ar), move(self.gen), self.counts)


class SampleBuilder:
    """Turns raw records into token ids / labels / image tensors in the official formats."""

    def __init__(self, tok: Tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig, system_prompt: str,
                 num_und_image_tokens: int):
        self.tok, self.data_cfg, self.system_prompt = tok, data_cfg, system_prompt
        self.und_cfg = model_cfg.und_encoder
        self.gen_size = model_cfg.gen_image_size
        self.num_image_tokens = num_und_image_tokens
        self.stats: Counter = Counter()

    def _truncate(self, ids: list[int], limit: int, what: str) -> list[int]:
        if len(ids) > limit:
            self.stats[f"truncated_{what}"] += 1
            return ids[:limit]
        return ids

    def gen(self, rec: CaptionRecord, rng: random.Random, center_crop: bool) -> dict:
        """Prompt = the official generation template without its last tag (t_emb takes its place)."""
        caption = self.tok.decode(self._truncate(self.tok.encode(rec.caption, add_bos=False),
                                                 self.data_cfg.max_text_len, "caption"))
        ids = self.tok.encode(sft_prompt(caption))
        image = gen_transform(rec.image, self.gen_size, rng if not center_crop else None)
        und = self.und_cfg
        # REPA's target: SigLIP features of the same (clean, cropped) image.
        repa_pixels = und_transform(_to_pil(image), und.image_size, und.image_mean, und.image_std)
        return {"ids": ids, "image": image, "repa_pixels": repa_pixels}

    def und(self, rec: ConversationRecord) -> dict:
        """Official SFT format; labels only on the assistant answers (+ EOS)."""
        ids = [self.tok.bos_id]
        labels = [IGNORE]
        head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        first_user = True
        for role, text in rec.turns:
            if role == "user":
                if first_user and rec.image is not None:
                    text = f"{IMAGE}\n{text}"
                first_user = False
                piece = self.tok.encode(f"{head}User: {text}\n\nAssistant:", add_bos=False)
                piece = expand_image_tokens(piece, self.tok, self.num_image_tokens)
                head = ""
                ids += piece
                labels += [IGNORE] * len(piece)
            else:
                piece = self.tok.encode(f" {text}{EOS}", add_bos=False)
                ids += piece
                labels += piece
        limit = self.data_cfg.max_seq_len
        ids, labels = self._truncate(ids, limit, "conversation"), labels[:limit]
        out = {"ids": ids, "labels": labels}
        if rec.image is not None:
            und = self.und_cfg
            out["pixels"] = und_transform(rec.image, und.image_size, und.image_mean, und.image_std)
        return out

    def text(self, rec: TextRecord) -> dict:
        ids = [self.tok.bos_id] + self.tok.encode(rec.text, add_bos=False)[: self.data_cfg.max_text_len]
        ids = self._truncate(ids, self.data_cfg.max_seq_len - 1, "text") + [self.tok.eos_id]
        return {"ids": ids, "labels": list(ids)}


def _to_pil(image: torch.Tensor):
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def collate_ar(samples: list[dict], tok: Tokenizer, tasks: list[str]) -> dict:
    """Right-padded understanding/text rows; image rows carry pixels and the image position mask."""
    width = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), width), tok.pad_id)
    labels = torch.full((len(samples), width), IGNORE)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["ids"]), torch.tensor(s["labels"]), 1
    pixels = [s["pixels"] for s in samples if "pixels" in s]
    return {
        "input_ids": ids, "labels": labels, "attention_mask": mask,
        "pixel_values": torch.stack(pixels) if pixels else None,
        "image_seq_mask": (ids == tok.image_id) | (ids == tok.boi_id),
        "is_und": torch.tensor([t == "und" for t in tasks]),
    }


def collate_gen(samples: list[dict], tok: Tokenizer, drop: list[bool]) -> dict:
    """Left-padded prompts. A CFG-dropped row keeps BOS; the rest of its prompt is pad and masked,
    exactly like the unconditional rows at sampling time."""
    width = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), width), tok.pad_id)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["ids"])
        ids[i, width - n:] = torch.tensor(s["ids"])
        mask[i, width - n:] = 1
        if drop[i]:
            ids[i, width - n + 1:] = tok.pad_id
            mask[i, width - n + 1:] = 0
    out = {"prefix_ids": ids, "prefix_mask": mask, "repa_pixels": torch.stack([s["repa_pixels"] for s in samples])}
    if all("latent" in s for s in samples):
        out["latents"] = torch.stack([s["latent"] for s in samples])
    else:
        out["images"] = torch.stack([s["image"] for s in samples])
    return out


class MixtureStream:
    """Deterministic global batches from task sources (lists of SourceDataset-like objects)."""

    def __init__(self, sources: dict[str, list], builder: SampleBuilder, schedule: MixtureSchedule, *,
                 seed: int, cfg_drop_prob: float, time_cfg: TimeSamplingConfig, latent_cache=None,
                 max_bad_fraction: float = 0.5):
        self.sources, self.builder, self.schedule = sources, builder, schedule
        self.seed, self.cfg_drop_prob, self.time_cfg = seed, cfg_drop_prob, time_cfg
        self.latent_cache = latent_cache
        self.max_bad_fraction = max_bad_fraction
        self.stats: Counter = Counter()

    def _record(self, task: str, rng: random.Random):
        srcs = self.sources.get(task) or []
        if not srcs:
            raise DataError(f"the mixture asks for {task} data but the recipe has no data.{task} source")
        weights = [getattr(s, "weight", 1.0) for s in srcs]
        for _ in range(1000):
            k = rng.choices(range(len(srcs)), weights=weights)[0] if len(srcs) > 1 else 0
            idx = rng.randrange(len(srcs[k]))
            rec = srcs[k][idx]
            if rec is not None:
                self.stats[f"{task}_ok"] += 1
                return k, idx, rec
            self.stats[f"{task}_skipped"] += 1
            seen = self.stats[f"{task}_ok"] + self.stats[f"{task}_skipped"]
            if seen >= 50 and self.stats[f"{task}_skipped"] > self.max_bad_fraction * seen:
                raise DataError(f"{self.stats[f'{task}_skipped']} of {seen} {task} records read so far are broken "
                                f"(more than data.max_bad_fraction={self.max_bad_fraction}); check the dataset")
        raise DataError(f"no readable {task} record found in 1000 tries")

    def global_batch(self, step: int, batch_size: int) -> list[tuple[str, dict]]:
        rng = random.Random(f"{self.seed}-{step}")
        out = []
        for task in self.schedule.composition(step, batch_size, rng):
            k, idx, rec = self._record(task, rng)
            if task == "gen":
                cached = self.latent_cache.get(k, idx) if self.latent_cache is not None else None
                sample = self.builder.gen(rec, rng, center_crop=self.latent_cache is not None)
                if cached is not None:
                    sample["latent"] = cached
                sample["drop"] = rng.random() < self.cfg_drop_prob
            elif task == "und":
                sample = self.builder.und(rec)
            else:
                sample = self.builder.text(rec)
            out.append((task, sample))
        return out

    def micro_batches(self, step: int, batch_size: int, micro_batch_size: int, rank: int = 0, world: int = 1):
        """The micro-batches of ``rank`` for ``step`` (global batch split into blocks of micro_batch_size)."""
        if batch_size % (micro_batch_size * world):
            raise ValueError(f"batch_size {batch_size} is not divisible by micro_batch_size {micro_batch_size} x "
                             f"{world} ranks")
        samples = self.global_batch(step, batch_size)
        blocks = [samples[i:i + micro_batch_size] for i in range(0, batch_size, micro_batch_size)]
        for b in range(rank, len(blocks), world):
            yield self._collate(blocks[b], step, b)

    def _collate(self, block: list[tuple[str, dict]], step: int, index: int) -> Batch:
        tok = self.builder.tok
        ar = [(t, s) for t, s in block if t != "gen"]
        gen = [s for t, s in block if t == "gen"]
        batch = Batch(size=len(block), counts=dict(Counter(t for t, _ in block)))
        if ar:
            batch.ar = collate_ar([s for _, s in ar], tok, [t for t, _ in ar])
        if gen:
            batch.gen = collate_gen(gen, tok, [s["drop"] for s in gen])
            g = torch.Generator().manual_seed(hash_seed(self.seed, step, index))
            t = self.time_cfg
            batch.gen["t"] = sample_t(len(gen), t.kind, t.mean, t.std, generator=g)
            batch.gen["noise_seed"] = hash_seed(self.seed, step, index, 1)
        return batch


def hash_seed(*parts: int) -> int:
    return random.Random("-".join(map(str, parts))).getrandbits(62)
