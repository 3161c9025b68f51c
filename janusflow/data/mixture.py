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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from janusflow.config import DataConfig, MixturePhase, ModelConfig, TimeSamplingConfig, UndEncoderConfig
from janusflow.data.sources import (
    CaptionRecord,
    CaptionSource,
    ConversationRecord,
    TextRecord,
    gen_transform,
    und_transform,
)
from janusflow.flow import sample_t
from janusflow.models.und_inputs import und_pixels
from janusflow.tokenizer import EOS, IMAGE, Tokenizer, expand_image_tokens, sft_prompt

log = logging.getLogger(__name__)
TASKS = ("gen", "und", "text")
IGNORE = -100
PROMPT_MEMORY = 100_000


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
            return {k: v.to(device, dtype if v.is_floating_point() else None, non_blocking=True)
                    if isinstance(v, torch.Tensor) else v for k, v in d.items()}

        return Batch(self.size, move(self.ar), move(self.gen), self.counts)

    def pin_memory(self) -> Batch:
        """Page-locked copies (called by the DataLoader's pin-memory thread) for asynchronous host-to-GPU copies."""

        def pin(d):
            return d and {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in d.items()}

        return Batch(self.size, pin(self.ar), pin(self.gen), self.counts)


class SampleBuilder:
    """Turns raw records into token ids / labels / image tensors in the official formats."""

    def __init__(self, tok: Tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig, system_prompt: str,
                 num_und_image_tokens: int):
        self.tok, self.data_cfg, self.system_prompt = tok, data_cfg, system_prompt
        self.model_cfg, self.und_cfg = model_cfg, model_cfg.und_encoder
        self.gen_size = model_cfg.gen_image_size
        self.num_image_tokens = num_und_image_tokens
        self.stats: Counter = Counter()
        self._prompts: dict[str, tuple[list[int], bool]] = {}
        # Truncating a conversation inside its image block would break every understanding sample.
        head = f"{system_prompt}\n\n" if system_prompt else ""
        first = expand_image_tokens(tok.encode(f"{head}User: {IMAGE}\n"), tok, num_und_image_tokens)
        if len(first) >= data_cfg.max_seq_len:
            raise ValueError(f"data.max_seq_len={data_cfg.max_seq_len} is too short: the system prompt and the "
                             f"{num_und_image_tokens} image tokens of an understanding sample take {len(first)}")

    def _truncate(self, ids: list[int], limit: int, what: str) -> list[int]:
        if len(ids) > limit:
            self.stats[f"truncated_{what}"] += 1
            return ids[:limit]
        return ids

    def prompt_ids(self, caption: str) -> list[int]:
        """The generation prompt's ids for a caption (truncated to data.max_text_len tokens); remembered for
        up to PROMPT_MEMORY captions, as datasets repeat captions and tokenizing is most of a cached gen sample."""
        if caption not in self._prompts:
            if len(self._prompts) >= PROMPT_MEMORY:
                self._prompts.clear()
            ids = self.tok.encode(caption, add_bos=False)
            truncated = len(ids) > self.data_cfg.max_text_len
            text = self.tok.decode(ids[:self.data_cfg.max_text_len])
            self._prompts[caption] = (self.tok.encode(sft_prompt(text)), truncated)
        ids, truncated = self._prompts[caption]
        if truncated:
            self.stats["truncated_caption"] += 1
        return list(ids)

    def gen(self, rec: CaptionRecord, rng: random.Random, center_crop: bool,
            repa_feats: torch.Tensor | None = None, repa: bool = True) -> dict:
        """Prompt = the official generation template without its last tag (t_emb takes its place).
        REPA's target is the SigLIP features of the same (clean, cropped) image: ``repa_feats`` when
        cached, else the pixels SigLIP will see; none at all with ``repa`` off."""
        ids = self.prompt_ids(rec.caption)
        if rec.image is None:  # a cached record: its latent (and REPA target) come from the caches
            return {"ids": ids} if repa_feats is None else {"ids": ids, "repa_feats": repa_feats}
        image = gen_transform(rec.image, self.gen_size, rng if not center_crop else None)
        if not repa:
            return {"ids": ids, "image": image}
        if repa_feats is not None:
            return {"ids": ids, "image": image, "repa_feats": repa_feats}
        return {"ids": ids, "image": image, "repa_pixels": repa_pixels(image, self.und_cfg)}

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
            out["pixels"] = und_pixels(rec.image, self.model_cfg)
        return out

    def text(self, rec: TextRecord) -> dict:
        limit = min(self.data_cfg.max_text_len, self.data_cfg.max_seq_len - 2)  # room for BOS and EOS
        ids = self._truncate(self.tok.encode(rec.text, add_bos=False), limit, "text")
        ids = [self.tok.bos_id, *ids, self.tok.eos_id]
        return {"ids": ids, "labels": list(ids)}


def repa_pixels(image: torch.Tensor, und: UndEncoderConfig) -> torch.Tensor:
    """A gen image [3, S, S] in [-1, 1] -> the understanding encoder's input (its official transform)."""
    return und_transform(_to_pil(image), und.image_size, und.image_mean, und.image_std)


def _to_pil(image: torch.Tensor):
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def collate_ar(samples: list[dict], tok: Tokenizer, tasks: list[str], pack: bool = False) -> dict:
    """Right-padded understanding/text rows; image rows carry pixels and the image position mask.

    ``sample_index`` [R, L] names the sample of each position (-1 on padding) and ``is_und`` [n] each
    sample's task. Packed (``pack``): several samples share a row no longer than the longest sample; each
    one's ``position_ids`` restart at 0 and there is no 2D attention mask, so transformers builds the
    block-diagonal causal mask from the restarts (a sample only sees itself; the trailing padding is a
    sequence of its own). Each sample's first label is ignored, as the unpacked shift does.
    """
    rows = pack_rows([len(s["ids"]) for s in samples]) if pack else [[i] for i in range(len(samples))]
    width = max(len(s["ids"]) for s in samples)
    shape = (len(rows), width)
    ids, labels = torch.full(shape, tok.pad_id), torch.full(shape, IGNORE)
    mask, index = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1)
    positions = torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = samples[i], len(samples[i]["ids"])
            ids[r, at:at + n], labels[r, at:at + n] = torch.tensor(s["ids"]), torch.tensor(s["labels"])
            labels[r, at] = IGNORE
            mask[r, at:at + n], index[r, at:at + n] = 1, i
            positions[r, at:] = torch.arange(width - at)
            at += n
    pixels = [samples[i]["pixels"] for row in rows for i in row if "pixels" in samples[i]]  # in position order
    out = {
        "input_ids": ids, "labels": labels, "attention_mask": mask, "sample_index": index,
        "pixel_values": torch.stack(pixels) if pixels else None,
        "image_seq_mask": (ids == tok.image_id) | (ids == tok.boi_id),
        "is_und": torch.tensor([t == "und" for t in tasks]),
    }
    if pack:
        out.update(attention_mask=None, position_ids=positions)
    return out


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, rows no longer than the longest sample."""
    width, rows, free = max(lengths), [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


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
    out = {"prefix_ids": ids, "prefix_mask": mask}
    if all("repa_feats" in s for s in samples):
        out["repa_feats"] = torch.stack([s["repa_feats"] for s in samples])
    elif all("repa_pixels" in s for s in samples):
        out["repa_pixels"] = torch.stack([s["repa_pixels"] for s in samples])
    if all("latent" in s for s in samples):
        out["latents"] = torch.stack([s["latent"] for s in samples])
    else:
        out["images"] = torch.stack([s["image"] for s in samples])
    return out


class MixtureStream:
    """Deterministic global batches from task sources (lists of SourceDataset-like objects)."""

    def __init__(self, sources: dict[str, list], builder: SampleBuilder, schedule: MixtureSchedule, *,
                 seed: int, cfg_drop_prob: float, time_cfg: TimeSamplingConfig, latent_cache=None, repa_cache=None,
                 max_bad_fraction: float = 0.5, packing: bool = False, repa: bool = True):
        """``latent_cache`` / ``repa_cache``: janusflow.data.latent_cache.RecordCache of the gen sources
        (centre crops); the REPA cache is only valid together with the latent cache (same crop).
        ``repa`` off: gen samples carry no REPA target (no SigLIP preprocessing per image)."""
        self.sources, self.builder, self.schedule = sources, builder, schedule
        self.seed, self.cfg_drop_prob, self.time_cfg = seed, cfg_drop_prob, time_cfg
        self.latent_cache = latent_cache
        self.repa_cache = repa_cache if latent_cache is not None else None
        self.max_bad_fraction = max_bad_fraction
        self.packing, self.repa = packing, repa
        self.stats: Counter = Counter()
        """Records used (``gen_ok``) and skipped (``gen_skipped``) per task, the skipped ones also by reason
        (``gen_bad_image``, ``text_bad_json``, ...): the ``data/*`` metrics, restored on resume."""
        for task, srcs in sources.items():
            for src in srcs:
                if len(src) == 0:
                    raise DataError(f"the {task} source {getattr(src, 'path', src)} has no records")
        if latent_cache is not None:
            self._check_cache(latent_cache.valid)

    def _check_cache(self, valid: list[torch.Tensor]) -> None:
        """Building the latent cache read every gen record once: a mostly broken source stops here."""
        for src, ok in zip(self.sources.get("gen") or [], valid):
            bad = len(ok) - int(ok.sum())
            if bad > self.max_bad_fraction * len(ok):
                raise DataError(f"{bad} of {len(ok)} gen records of {getattr(src, 'path', src)} are broken (more "
                                f"than data.max_bad_fraction={self.max_bad_fraction}){_reasons(src)}")

    def _record(self, task: str, rng: random.Random):
        srcs = self.sources.get(task) or []
        if not srcs:
            raise DataError(f"the mixture asks for {task} data but the recipe has no data.{task} source")
        weights = [getattr(s, "weight", 1.0) for s in srcs]
        for _ in range(1000):
            k = rng.choices(range(len(srcs)), weights=weights)[0] if len(srcs) > 1 else 0
            idx = rng.randrange(len(srcs[k]))
            rec = self._cached_record(srcs[k], k, idx) if task == "gen" and self._gen_from_caches else srcs[k][idx]
            if rec is not None:
                self.stats[f"{task}_ok"] += 1
                return k, idx, rec
            self.stats[f"{task}_skipped"] += 1
            self.stats[f"{task}_{getattr(srcs[k], 'last_reason', None) or 'bad_record'}"] += 1
            seen = self.stats[f"{task}_ok"] + self.stats[f"{task}_skipped"]
            if seen >= 50 and self.stats[f"{task}_skipped"] > self.max_bad_fraction * seen:
                paths = ", ".join(str(getattr(s, "path", s)) for s in srcs)
                raise DataError(f"{self.stats[f'{task}_skipped']} of {seen} {task} records read so far are broken "
                                f"(more than data.max_bad_fraction={self.max_bad_fraction}) in {paths}"
                                f"{_reasons(srcs[k])}")
        raise DataError(f"no readable {task} record found in 1000 tries")

    @property
    def _gen_from_caches(self) -> bool:
        """The caches hold everything a gen image gives (its latent and, with REPA on, REPA's target)."""
        return self.latent_cache is not None and (not self.repa or self.repa_cache is not None)

    def _cached_record(self, src, k: int, idx: int) -> CaptionRecord | None:
        """A gen record whose image the caches stand in for: its caption alone (decoding the image would be
        wasted), or None for a record the caches lack, which was unreadable when they were built."""
        cached = self.latent_cache.has(k, idx) and (not self.repa or self.repa_cache.has(k, idx))
        if not cached:
            rec = src[idx]  # counts the reason it is unreadable
            if rec is not None:  # readable now, but changed on disk since: skipped all the same
                src.count_bad("not_in_cache", f"record {idx} was unreadable when the latent cache was built")
            return None
        return src.caption_record(idx) if isinstance(src, CaptionSource) else src[idx]

    def global_batch(self, step: int, batch_size: int) -> list[tuple[str, dict]]:
        rng = random.Random(f"{self.seed}-{step}")
        out = []
        for task in self.schedule.composition(step, batch_size, rng):
            k, idx, rec = self._record(task, rng)
            if task == "gen":
                cached = self.latent_cache.get(k, idx) if self.latent_cache is not None else None
                feats = self.repa_cache.get(k, idx) if self.repa_cache is not None else None
                sample = self.builder.gen(rec, rng, center_crop=self.latent_cache is not None, repa_feats=feats,
                                          repa=self.repa)
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

    def batches(self, start: int, stop: int, batch_size: int, micro_batch_size: int, rank: int = 0, world: int = 1,
                num_workers: int = 0, pin_memory: bool = False) -> Iterator[list[Batch]]:
        """This rank's micro-batches of every step in [start, stop), in order: exactly ``micro_batches(step, ...)``.

        With ``num_workers`` > 0, worker processes build the steps ahead (a torch DataLoader over the step
        index; pinned memory for a GPU); each step's data counters travel with it into ``stats``.
        """
        if num_workers == 0:
            for step in range(start, stop):
                yield list(self.micro_batches(step, batch_size, micro_batch_size, rank, world))
            return
        steps = StepBatches(self, start, stop, batch_size, micro_batch_size, rank, world)
        loader = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                             collate_fn=_as_is)
        for micros, stats, builder_stats in loader:
            self.stats.update(stats)
            self.builder.stats.update(builder_stats)
            yield micros

    def _collate(self, block: list[tuple[str, dict]], step: int, index: int) -> Batch:
        tok = self.builder.tok
        ar = [(t, s) for t, s in block if t != "gen"]
        gen = [s for t, s in block if t == "gen"]
        batch = Batch(size=len(block), counts=dict(Counter(t for t, _ in block)))
        if ar:
            batch.ar = collate_ar([s for _, s in ar], tok, [t for t, _ in ar], pack=self.packing)
        if gen:
            if self.repa and not all("repa_feats" in s for s in gen):  # a record the cache missed: all go live
                for s in gen:
                    s.setdefault("repa_pixels", repa_pixels(s["image"], self.builder.und_cfg))
            batch.gen = collate_gen(gen, tok, [s["drop"] for s in gen])
            g = torch.Generator().manual_seed(hash_seed(self.seed, step, index))
            t = self.time_cfg
            batch.gen["t"] = sample_t(len(gen), t.kind, t.mean, t.std, generator=g)
            batch.gen["noise_seed"] = hash_seed(self.seed, step, index, 1)
        return batch


def _reasons(src) -> str:
    """``: bad_image 40, missing_file 3; latest: <message>`` from a source's counters (empty if it has none)."""
    stats = {k: v for k, v in getattr(src, "stats", {}).items() if k != "ok"}
    if not stats:
        return ""
    last = getattr(src, "last_error", {}).get(getattr(src, "last_reason", None), "")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.items(), key=lambda kv: -kv[1]))
    return f": {counts}" + (f"; latest: {last}" if last else "")


class StepBatches(torch.utils.data.Dataset):
    """Item i: a rank's micro-batches of step ``start + i``, and the data counters that building them added."""

    def __init__(self, stream: MixtureStream, start: int, stop: int, batch_size: int, micro_batch_size: int,
                 rank: int, world: int):
        self.stream, self.start, self.stop = stream, start, stop
        self.args = (batch_size, micro_batch_size, rank, world)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[list[Batch], Counter, Counter]:
        stream = self.stream
        before, builder_before = Counter(stream.stats), Counter(stream.builder.stats)
        micros = list(stream.micro_batches(self.start + i, *self.args))
        return micros, stream.stats - before, stream.builder.stats - builder_before


def _as_is(item):
    return item


def hash_seed(*parts: int) -> int:
    return random.Random("-".join(map(str, parts))).getrandbits(62)
