"""What a training run reads: each stage's sources (the recipe's ``data``, or the stage's own ``stages.N.data``)
opened once, the latent and REPA-target caches built once (rank 0 first, then read by every rank), and each
stage's deterministic data stream.

    data = RunData(recipe, prep["data_dir"], codec, codec_path)
    sources = data.sources(index)                    # {"und": [...], "gen": [...], "text": [...]}
    stream = data.stream(index, tokenizer, repa_targets, repa=True)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from janusflow.config import Recipe, SourceConfig, to_dict
from janusflow.data.latent_cache import FORMAT, RecordCache, latent_writer, repa_writer, weights_digest
from janusflow.data.mixture import MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.data.sources import SourceDataset, open_source
from janusflow.models.gen_encdec import token_grid
from janusflow.models.und_inputs import num_und_tokens
from janusflow.train.distributed import barrier, rank, world_size
from janusflow.train.logging import print0
from janusflow.train.prep import cache_root, config_hash

TASKS = ("und", "gen", "text")


def resolve(source: SourceConfig, shapes_dir: str | Path | None) -> SourceConfig:
    """``{shapes}`` in a source's path replaced by the prepared shapes world's folder."""
    if shapes_dir is None or "{shapes}" not in source.path:
        return source
    return dataclasses.replace(source, path=source.path.replace("{shapes}", str(shapes_dir)))


def open_configured(cfg: SourceConfig) -> SourceDataset:
    src = open_source(cfg.path, cfg.format, cfg.image_root)
    src.weight, src.template = cfg.weight, cfg.template
    return src


class RunData:
    """The sources and caches of a run's stages (stages naming the same sources share them)."""

    def __init__(self, recipe: Recipe, shapes_dir: str | Path | None, codec, codec_path: str | None):
        self.recipe, self.shapes_dir, self.codec, self.codec_path = recipe, shapes_dir, codec, codec_path
        self._opened: dict[str, SourceDataset] = {}
        self._latents: dict[tuple, RecordCache | None] = {}

    def source_cfgs(self, index: int) -> dict[str, list[SourceConfig]]:
        """Stage ``index``'s sources per task: its own ``data`` where it has them, else the recipe's."""
        own = self.recipe.stages[index].data
        overrides = {t: getattr(own, t) for t in TASKS if own is not None and getattr(own, t) is not None}
        chosen = {t: overrides.get(t, getattr(self.recipe.data, t)) for t in TASKS}
        return {task: [resolve(s, self.shapes_dir) for s in cfgs] for task, cfgs in chosen.items()}

    def sources(self, index: int) -> dict[str, list[SourceDataset]]:
        out = {}
        for task, cfgs in self.source_cfgs(index).items():
            for cfg in cfgs:
                key = repr(cfg)
                if key not in self._opened:
                    self._opened[key] = open_configured(cfg)
            out[task] = [self._opened[repr(cfg)] for cfg in cfgs]
        return out

    def latents(self, index: int) -> RecordCache | None:
        """Codec latents of every gen image of the stage (K crops each), keyed by the codec and each source."""
        r, gen_cfgs = self.recipe, self.source_cfgs(index)["gen"]
        if not r.data.cache_latents or not gen_cfgs:
            return None
        ident = tuple(repr(c) for c in gen_cfgs)
        if ident not in self._latents:
            key = config_hash(str(self.codec_path), to_dict(r.codec), r.model.gen_image_size, r.data.latent_crops,
                              FORMAT)
            folders = [cache_root(r) / f"latents-{key}-{config_hash(s.path)}" for s in gen_cfgs]
            writer = latent_writer(self.codec, r.model.gen_image_size)
            self._latents[ident] = self._shared_cache("latents", index, writer, folders, torch.float32)
        return self._latents[ident]

    def repa_targets(self, index: int, model, device) -> RecordCache | None:
        """REPA's targets for every gen image, cached when SigLIP is frozen this stage and the cache fits
        ``data.repa_cache_max_gb`` (else None: computed live). Keyed by SigLIP's weights, so stages 1 and 2 (the
        same frozen tower) share one cache."""
        r, encoder = self.recipe, model.vision_und_enc_model
        if self.latents(index) is None or not r.data.cache_repa_features or any(
                p.requires_grad for p in encoder.parameters()):
            return None
        size_gb = self._repa_cache_gb(index)
        if size_gb > r.data.repa_cache_max_gb:
            print0(f"REPA targets are computed live: their cache would take {size_gb:.1f} GB "
                   f"(> data.repa_cache_max_gb={r.data.repa_cache_max_gb:g})")
            return None
        key = config_hash(weights_digest(encoder), to_dict(r.model.und_encoder), r.model.gen_image_size,
                          r.data.latent_crops, FORMAT)
        folders = [cache_root(r) / f"repa-{key}-{config_hash(s.path)}" for s in self.source_cfgs(index)["gen"]]
        encoder.to(device)
        writer = repa_writer(encoder, r.model.und_encoder, r.model.gen_image_size)
        return self._shared_cache("features", index, writer, folders, torch.float16)

    def _repa_cache_gb(self, index: int) -> float:
        und = self.recipe.model.und_encoder
        per_crop = (und.image_size // und.patch_size) ** 2 * und.width * 2  # fp16
        records = sum(len(s) for s in self.sources(index)["gen"])
        return records * self.recipe.data.latent_crops * per_crop / 1e9

    def _shared_cache(self, name: str, index: int, writer: tuple, folders: list[Path], dtype) -> RecordCache:
        """Every rank encodes its share of the missing shards; after a barrier all of them map every shard."""
        RecordCache.write(name, self.sources(index)["gen"], *writer, folders, self.recipe.data.latent_crops, dtype,
                          rank=rank(), world=world_size())
        barrier()
        return RecordCache.load(name, folders)

    def stream(self, index: int, tokenizer, repa_targets: RecordCache | None, repa: bool) -> MixtureStream:
        """Stage ``index``'s data stream: a pure function of (train.seed, stage index, step)."""
        r, model_cfg, data = self.recipe, self.recipe.model, self.recipe.data
        latent_hw = self.codec.latent_shape(model_cfg.gen_image_size)[1:]
        h, w = token_grid(latent_hw, model_cfg.gen_encoder.kernel_size, model_cfg.gen_encoder.stride)
        n_und = num_und_tokens(model_cfg, latent_hw)
        builder = SampleBuilder(tokenizer, model_cfg, data, data.und_system_prompt, n_und)
        stage = r.stages[index]
        return MixtureStream(self.sources(index), builder, MixtureSchedule(stage.mixture),
                             seed=r.train.seed + 1000 * index, cfg_drop_prob=data.cfg_drop_prob,
                             time_cfg=r.train.time_sampling, latent_cache=self.latents(index),
                             repa_cache=repa_targets, max_bad_fraction=data.max_bad_fraction, repa=repa,
                             pack_length=data.pack_length, gen_tokens=h * w, batch_unit=stage.batch_unit)
