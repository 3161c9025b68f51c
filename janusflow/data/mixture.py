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

import torch

from janusflow.config import DataConfig, MixturePhase, ModelConfig, TimeSamplingConfig
from janusflow.data.batch import (
    IGNORE,
    ArSample,
    Batch,
    GenSample,
    collate_ar,
    collate_gen,
    collate_packed,
    pack_rows,
    sample_length,
)
from janusflow.data.sources import CaptionRecord, CaptionSource, ConversationRecord, TextRecord
from janusflow.data.transforms import gen_crop, und_pixels
from janusflow.flow import sample_t
from janusflow.tokenizer import EOS, IMAGE, Tokenizer, expand_image_tokens, sft_prompt

log = logging.getLogger(__name__)
TASKS = ("gen", "und", "text")
CAPTION_INSTRUCTION = "Generate the caption of this picture."
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

    def expected_samples(self, steps: int, batch_size: int) -> dict[str, float]:
        """Samples of each task that ``steps`` steps of ``batch_size`` samples draw, in expectation."""
        out = dict.fromkeys(TASKS, 0.0)
        start = 0
        for phase in self.phases:
            end = steps if phase.until_step is None else min(phase.until_step, steps)
            ratios = self.ratios(start)
            for task in TASKS:
                out[task] += max(end - start, 0) * batch_size * ratios[task]
            start = max(start, end)
        return out

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

    def prompt_ids(self, caption: str, template: str = "sft") -> list[int]:
        """A generation prompt's ids (the caption truncated to data.max_text_len tokens) in its template: ``sft``
        "User: {caption}\\n\\nAssistant:", ``raw`` the caption alone (the paper's stages 1-2), both after BOS and
        before the image. Remembered for up to PROMPT_MEMORY captions: datasets repeat captions, and tokenizing is
        most of a cached gen sample's cost."""
        key = (template, caption)
        if key not in self._prompts:
            if len(self._prompts) >= PROMPT_MEMORY:
                self._prompts.clear()
            ids = self.tok.encode(caption, add_bos=False)
            truncated = len(ids) > self.data_cfg.max_text_len
            text = self.tok.decode(ids[:self.data_cfg.max_text_len])
            self._prompts[key] = (self.tok.encode(text if template == "raw" else sft_prompt(text)), truncated)
        ids, truncated = self._prompts[key]
        if truncated:
            self.stats["truncated_caption"] += 1
        return list(ids)

    def gen(self, rec: CaptionRecord, rng: random.Random, center_crop: bool, drop_prob: float,
            latent: torch.Tensor | None = None, repa_target: torch.Tensor | None = None,
            template: str = "sft") -> GenSample:
        """The prompt in its template (the image's begin tag is left out: t_emb takes its place); the crop when the
        record's image was read (a cached record gives only its caption); then the CFG dropout draw."""
        ids = self.prompt_ids(rec.caption, "raw" if template == "raw" else "sft")
        crop = gen_crop(rec.image, self.gen_size, rng if not center_crop else None) if rec.image is not None else None
        return GenSample(ids, rng.random() < drop_prob, crop=crop, latent=latent, repa_target=repa_target)

    def und(self, rec: ConversationRecord | CaptionRecord) -> ArSample:
        """Official SFT format; labels only on the assistant answers (+ EOS). Image-caption records take the
        paper's caption template instead."""
        if isinstance(rec, CaptionRecord):
            return self.caption(rec)
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
        return self._und_sample(ids, labels, rec.image)

    def caption(self, rec: CaptionRecord) -> ArSample:
        """The paper's caption template "<image>Generate the caption of this picture. <caption>": labels on the
        caption (+ EOS)."""
        prompt = expand_image_tokens(self.tok.encode(f"{IMAGE}{CAPTION_INSTRUCTION}"), self.tok, self.num_image_tokens)
        answer = self._truncate(self.tok.encode(f" {rec.caption}", add_bos=False), self.data_cfg.max_text_len,
                                "caption") + [self.tok.eos_id]
        return self._und_sample(prompt + answer, [IGNORE] * len(prompt) + answer, rec.image)

    def _und_sample(self, ids: list[int], labels: list[int], image) -> ArSample:
        limit = self.data_cfg.max_seq_len
        ids, labels = self._truncate(ids, limit, "conversation"), labels[:limit]
        return ArSample("und", ids, labels, und_pixels(image, self.model_cfg) if image is not None else None)

    def text(self, rec: TextRecord, rng: random.Random, all_chunks: bool = False) -> list[ArSample]:
        """A text line as [BOS, tokens, EOS]; a line longer than the context is cut into chunks of the context
        (counted as ``text_chunked``), all of them (``all_chunks``, for packed rows) or one drawn from ``rng``."""
        size = self.data_cfg.max_seq_len - 2  # room for BOS and EOS
        ids = self.tok.encode(rec.text, add_bos=False)
        chunks = [ids[i:i + size] for i in range(0, max(len(ids), 1), size)]
        if len(chunks) > 1:
            self.stats["text_chunked"] += 1
            chunks = chunks if all_chunks else [chunks[rng.randrange(len(chunks))]]
        return [ArSample("text", c, list(c)) for c in ([self.tok.bos_id, *c, self.tok.eos_id] for c in chunks)]


class MixtureStream:
    """Deterministic global batches from task sources (lists of SourceDataset-like objects).

    ``batch_unit`` "samples": a global batch of B samples whose tasks follow the ratio schedule exactly; with
    ``pack_length`` each micro-batch's samples are then packed into rows of that many tokens. "sequences": a
    global batch of B packed rows, filled in order with samples whose tasks are drawn at the ratio.
    """

    def __init__(self, sources: dict[str, list], builder: SampleBuilder, schedule: MixtureSchedule, *,
                 seed: int, cfg_drop_prob: float, time_cfg: TimeSamplingConfig, latent_cache=None, repa_cache=None,
                 max_bad_fraction: float = 0.5, repa: bool = True, pack_length: int = 0, gen_tokens: int = 0,
                 batch_unit: str = "samples"):
        """``latent_cache`` / ``repa_cache``: janusflow.data.latent_cache.RecordCache of the gen sources (the same
        crops of each image); the REPA cache is only valid together with the latent cache. ``repa`` off: gen samples
        carry no REPA target. ``gen_tokens``: the image tokens of a generation sample (its length when packed)."""
        self.sources, self.builder, self.schedule = sources, builder, schedule
        self.seed, self.cfg_drop_prob, self.time_cfg = seed, cfg_drop_prob, time_cfg
        self.latent_cache = latent_cache
        self.repa_cache = repa_cache if latent_cache is not None else None
        self.max_bad_fraction, self.repa = max_bad_fraction, repa
        self.pack_length, self.gen_tokens, self.batch_unit = pack_length, gen_tokens, batch_unit
        self.stats: Counter = Counter()
        """Records used (``gen_ok``) and skipped (``gen_skipped``) per task, the skipped ones also by reason
        (``gen_bad_image``, ``text_bad_json``, ...): the ``data/*`` metrics, restored on resume."""
        for task, srcs in sources.items():
            for src in srcs:
                if len(src) == 0:
                    raise DataError(f"the {task} source {getattr(src, 'path', src)} has no records")
        if batch_unit == "sequences" and not pack_length:
            raise ValueError("batch_unit 'sequences' counts packed rows: it needs data.pack_length > 0")
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

    def _samples(self, task: str, rng: random.Random, all_chunks: bool = False) -> list[ArSample | GenSample]:
        """The samples of one record of ``task`` drawn from ``rng`` (several only for a long text with
        ``all_chunks``)."""
        k, idx, rec = self._record(task, rng)
        if task == "und":
            return [self.builder.und(rec)]
        if task == "text":
            return self.builder.text(rec, rng, all_chunks)
        cache, targets = self.latent_cache, self.repa_cache
        crop = rng.randrange(cache.crops) if cache is not None and cache.crops > 1 else 0
        return [self.builder.gen(rec, rng, center_crop=cache is not None, drop_prob=self.cfg_drop_prob,
                                 latent=cache.get(k, idx, crop) if cache is not None else None,
                                 repa_target=targets.get(k, idx, crop) if targets is not None else None,
                                 template=getattr(self.sources["gen"][k], "template", "sft"))]

    def global_batch(self, step: int, batch_size: int) -> list[ArSample | GenSample]:
        """``batch_size`` samples, their tasks in the schedule's exact proportion."""
        rng = random.Random(f"{self.seed}-{step}")
        return [self._samples(task, rng)[0] for task in self.schedule.composition(step, batch_size, rng)]

    def global_rows(self, step: int, rows: int) -> list[list[ArSample | GenSample]]:
        """``rows`` rows of ``pack_length`` tokens filled in order with samples whose tasks are drawn at the
        schedule's ratio; the sample that first overflows the last row is left out."""
        rng = random.Random(f"{self.seed}-{step}")
        ratios = self.schedule.ratios(step)
        tasks, weights = [t for t in TASKS if ratios[t] > 0], [ratios[t] for t in TASKS if ratios[t] > 0]
        out, row, used = [], [], 0
        while len(out) < rows:
            for sample in self._samples(rng.choices(tasks, weights)[0], rng, all_chunks=True):
                n = sample_length(sample, self.gen_tokens)
                if n > self.pack_length:
                    raise DataError(f"a sample of {n} tokens does not fit data.pack_length={self.pack_length}")
                if used + n > self.pack_length:
                    out.append(row)
                    row, used = [], 0
                row.append(sample)
                used += n
        return out[:rows]

    def micro_batches(self, step: int, batch_size: int, micro_batch_size: int, rank: int = 0, world: int = 1):
        """The micro-batches of ``rank`` for ``step``: the global batch (samples, or packed rows) split into blocks
        of ``micro_batch_size``, block b going to rank b % world."""
        if batch_size % (micro_batch_size * world):
            raise ValueError(f"batch_size {batch_size} is not divisible by micro_batch_size {micro_batch_size} x "
                             f"{world} ranks")
        if self.batch_unit == "sequences":
            rows = self.global_rows(step, batch_size)
            for b in range(rank, batch_size // micro_batch_size, world):
                block = rows[b * micro_batch_size:(b + 1) * micro_batch_size]
                yield self._collate([s for row in block for s in row], step, b, [len(row) for row in block])
            return
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

    def _collate(self, block: list[ArSample | GenSample], step: int, index: int,
                 row_sizes: list[int] | None = None) -> Batch:
        """A micro-batch; the gen rows' times and noise come from (seed, step, block index) alone. Packed: rows
        of the given sizes (sequences), or the block first-fit into rows of pack_length (samples)."""
        tok = self.builder.tok
        gen = [s for s in block if isinstance(s, GenSample)]
        batch = Batch(size=len(block), counts=dict(Counter("gen" if isinstance(s, GenSample) else s.task
                                                           for s in block)))
        t, noise_seed = None, hash_seed(self.seed, step, index, 1)
        if gen:
            tc = self.time_cfg
            t = sample_t(len(gen), tc.kind, tc.mean, tc.std,
                         generator=torch.Generator().manual_seed(hash_seed(self.seed, step, index)))
        if self.pack_length:
            rows = _rows_of(row_sizes) if row_sizes else pack_rows(
                [sample_length(s, self.gen_tokens) for s in block], self.pack_length)
            batch.ar, batch.gen, batch.layout = collate_packed(block, rows, self.pack_length, tok, self.gen_tokens,
                                                               t, noise_seed)
            return batch
        ar = [s for s in block if isinstance(s, ArSample)]
        if ar:
            batch.ar = collate_ar(ar, tok)
        if gen:
            batch.gen = collate_gen(gen, tok, t, noise_seed)
        return batch


def _rows_of(sizes: list[int]) -> list[list[int]]:
    """Consecutive sample indices grouped into rows of the given sizes."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [list(range(start, start + n)) for start, n in zip(starts, sizes)]


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
