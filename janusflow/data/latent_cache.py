"""Per-record caches of generation data: latents (the frozen codec) and REPA targets (the frozen SigLIP).

The paper crops generation images at random (short side to the size, then a random square crop). A cache holds
K crops of each image (``data.latent_crops``): crop 0 is the centre crop, crop k >= 1 a random one drawn from
(record, k) alone; the data stream picks one of the K at random for each use. Both caches see the same crops, so
a record's cached latent and REPA target correspond exactly. Cost: K encodes per image and K times the disk.

A source's cache is a folder (named by a hash of the source, of K and of what encoded it: for REPA a digest of the
encoder's weights, so a changed encoder never reads stale features) of shards of ``SHARD_RECORDS`` records,
``shard-00000.pt`` = {name: [S, K, ...], "valid": [S]}, each written atomically. Every rank encodes the missing
shards i with i % world == rank (an interrupted build resumes with the shards still missing); then every rank
memory-maps all of them, so neither the build nor the reading holds a whole dataset's cache in memory.

    write_latent_cache(sources, codec, 384, folders, crops=4, rank=r, world=w)   # this rank's share
    latents = RecordCache.load("latents", folders)                              # after a barrier
    latents.get(source=0, index=17, crop=2)   # [C, h, w], or None for a record that could not be read
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from janusflow.config import UndEncoderConfig
from janusflow.data.transforms import gen_crop, gen_pixels, siglip_view
from janusflow.io import atomic_path

FORMAT = 3  # 2: K crops per record ([N, K, ...]); 3: a folder of shards per source
SHARD_RECORDS = 4096  # a multiple of the encode batch, so that shards batch records as one pass would


def cached_crop(image, index: int, crop: int, size: int) -> torch.Tensor:
    """Crop ``crop`` of record ``index``: the centre crop for 0, else a random square crop from (index, crop)."""
    return gen_crop(image, size, random.Random(f"crop-{index}-{crop}") if crop else None)


class RecordCache:
    """K tensors per record of each source (``get(source, index, crop)``), None where a record was broken."""

    def __init__(self, shards: list[list[dict]], name: str):
        self.shards, self.name = shards, name
        self.valid = [torch.cat([s["valid"] for s in per_source]) for per_source in shards]
        """Per source: bool [N], the records that could be read when the cache was built."""
        self.crops = shards[0][0][name].shape[1] if shards and shards[0] else 1

    def has(self, source: int, index: int) -> bool:
        return bool(self.valid[source][index])

    def get(self, source: int, index: int, crop: int = 0) -> torch.Tensor | None:
        if not self.has(source, index):
            return None
        shard = self.shards[source][index // SHARD_RECORDS]
        return shard[self.name][index % SHARD_RECORDS, crop].float()

    @classmethod
    def load(cls, name: str, folders: list[Path]) -> RecordCache:
        """Memory-map every shard of every source's folder (written by ``write``)."""
        shards = []
        for folder in folders:
            files = sorted(Path(folder).glob("shard-*.pt"))
            shards.append([torch.load(f, weights_only=True, mmap=True) for f in files])
        return cls(shards, name)

    @staticmethod
    def write(name: str, sources: list, encode: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
              shape: tuple[int, ...], folders: list[Path], crops: int = 1, dtype: torch.dtype = torch.float32,
              rank: int = 0, world: int = 1, batch_size: int = 64) -> None:
        """Encode this rank's missing shards: ``values[i, k] = encode(transform(image_i, i, k))``, batched."""
        for src, folder in zip(sources, folders):
            for shard in range(rank, math.ceil(len(src) / SHARD_RECORDS), world):
                path = Path(folder) / f"shard-{shard:05d}.pt"
                if not path.exists():
                    start = shard * SHARD_RECORDS
                    stop = min(start + SHARD_RECORDS, len(src))
                    _encode_shard(name, src, range(start, stop), encode, transform, (crops, *shape), path, dtype,
                                  batch_size)


def latent_writer(codec, image_size: int) -> tuple[Callable, Callable, tuple[int, ...]]:
    """(encode, transform, shape) of the latent cache: scaled codec latents [C, h, w] (fp32)."""
    def transform(img, i: int, k: int) -> torch.Tensor:
        return gen_pixels(cached_crop(img, i, k, image_size))

    return codec.encode, transform, codec.latent_shape(image_size)


def repa_writer(encoder: nn.Module, und_cfg: UndEncoderConfig, image_size: int) -> tuple[Callable, Callable, tuple]:
    """(encode, transform, shape) of REPA's targets: SigLIP patch features [N, width] of the crops, computed as the
    live path does (stored in fp16: half the disk of fp32, ~5e-4 relative rounding)."""
    param = next(encoder.parameters())

    def encode(x: torch.Tensor) -> torch.Tensor:
        return encoder(x.to(param.device, param.dtype))

    shape = ((und_cfg.image_size // und_cfg.patch_size) ** 2, und_cfg.width)
    return encode, lambda img, i, k: siglip_view(cached_crop(img, i, k, image_size), und_cfg), shape


def build_latent_cache(sources: list, codec, image_size: int, folders: list[Path], crops: int = 1) -> RecordCache:
    """The latent cache in one process: write every missing shard, then load."""
    RecordCache.write("latents", sources, *latent_writer(codec, image_size), folders, crops)
    return RecordCache.load("latents", folders)


def build_repa_cache(sources: list, encoder: nn.Module, und_cfg: UndEncoderConfig, image_size: int,
                     folders: list[Path], crops: int = 1) -> RecordCache:
    """The REPA target cache in one process: write every missing shard, then load."""
    RecordCache.write("features", sources, *repa_writer(encoder, und_cfg, image_size), folders, crops,
                      dtype=torch.float16)
    return RecordCache.load("features", folders)


def weights_digest(module: nn.Module) -> str:
    """A hash of a module's parameter and buffer values (names included)."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _encode_shard(name: str, src, records: range, encode: Callable, transform: Callable, shape: tuple[int, ...],
                  path: Path, dtype: torch.dtype, batch_size: int) -> None:
    out = torch.zeros(len(records), *shape, dtype=dtype)
    valid = torch.zeros(len(records), dtype=torch.bool)
    pending: list[tuple[int, int, torch.Tensor]] = []

    def flush():
        if pending:
            rows, crops = [i for i, _, _ in pending], [k for _, k, _ in pending]
            out[rows, crops] = encode(torch.stack([x for _, _, x in pending])).to("cpu", dtype)
            valid[rows] = True
            pending.clear()

    for row, i in enumerate(tqdm(records, desc=f"prep: encoding {name} ({path.name})", leave=False, disable=None)):
        rec = src[i]
        if rec is not None:
            pending += [(row, k, transform(rec.image, i, k)) for k in range(shape[0])]
        if len(pending) >= batch_size:
            flush()
    flush()
    with atomic_path(path) as tmp:
        torch.save({name: out, "valid": valid}, tmp)
