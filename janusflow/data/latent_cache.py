"""Per-record caches of generation data: latents (the frozen codec) and REPA targets (the frozen SigLIP).

The paper crops generation images at random (short side to the size, then a random square crop). A cache holds
K crops of each image (``data.latent_crops``): crop 0 is the centre crop, crop k >= 1 a random one drawn from
(record, k) alone; the data stream picks one of the K at random for each use. Both caches see the same crops, so
a record's cached latent and REPA target correspond exactly. Cost: K encodes per image and K times the disk.
A cache is one tensor file per source, named by a hash of the source, of K and of what encoded it (for REPA, a
digest of the encoder's weights: a changed encoder never reads stale features). Files are memory-mapped, so
data-loader workers share one copy.

    latents = build_latent_cache(sources, codec, 384, paths, crops=4)
    latents.get(source=0, index=17, crop=2)   # [C, h, w], or None for a record that could not be read
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from janusflow.config import UndEncoderConfig
from janusflow.data.transforms import gen_crop, gen_pixels, siglip_view
from janusflow.io import atomic_path

FORMAT = 2  # 2: K crops per record ([N, K, ...])


def cached_crop(image, index: int, crop: int, size: int) -> torch.Tensor:
    """Crop ``crop`` of record ``index``: the centre crop for 0, else a random square crop from (index, crop)."""
    return gen_crop(image, size, random.Random(f"crop-{index}-{crop}") if crop else None)


class RecordCache:
    """K tensors per record of each source (``values[source][index, crop]``), None where a record was broken."""

    def __init__(self, values: list[torch.Tensor], valid: list[torch.Tensor]):
        self.values, self.valid = values, valid
        self.crops = values[0].shape[1] if values else 1

    def has(self, source: int, index: int) -> bool:
        return bool(self.valid[source][index])

    def get(self, source: int, index: int, crop: int = 0) -> torch.Tensor | None:
        return self.values[source][index, crop].float() if self.has(source, index) else None

    @classmethod
    def build(cls, name: str, sources: list, encode: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
              shape: tuple[int, ...], paths: list[Path], crops: int = 1, dtype: torch.dtype = torch.float32,
              batch_size: int = 64) -> RecordCache:
        """Load each source's file (``{name: values, "valid": mask}``), first writing it when absent:
        ``values[i, k] = encode(transform(image_i, i, k))``, batched."""
        values, valid = [], []
        for src, path in zip(sources, paths):
            if not path.exists():
                _encode_source(name, src, encode, transform, (crops, *shape), path, dtype, batch_size)
            data = torch.load(path, weights_only=True, mmap=True)
            values.append(data[name])
            valid.append(data["valid"])
        return cls(values, valid)


def build_latent_cache(sources: list, codec, image_size: int, paths: list[Path], crops: int = 1) -> RecordCache:
    """Scaled codec latents [C, h, w] of K crops of every gen image (fp32)."""
    return RecordCache.build("latents", sources, codec.encode,
                             lambda img, i, k: gen_pixels(cached_crop(img, i, k, image_size)),
                             codec.latent_shape(image_size), paths, crops)


def build_repa_cache(sources: list, encoder: nn.Module, und_cfg: UndEncoderConfig, image_size: int,
                     paths: list[Path], crops: int = 1) -> RecordCache:
    """SigLIP patch features [N, width] of K crops of every gen image: REPA's target, computed exactly as the
    live path does, stored in fp16 (half the disk of fp32; ~5e-4 relative rounding)."""
    device = next(encoder.parameters()).device

    def transform(img, i, k):
        return siglip_view(cached_crop(img, i, k, image_size), und_cfg)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return encoder(x.to(device, next(encoder.parameters()).dtype))

    shape = ((und_cfg.image_size // und_cfg.patch_size) ** 2, und_cfg.width)
    return RecordCache.build("features", sources, encode, transform, shape, paths, crops, dtype=torch.float16)


def weights_digest(module: nn.Module) -> str:
    """A hash of a module's parameter and buffer values (names included)."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _encode_source(name: str, src, encode: Callable, transform: Callable, shape: tuple[int, ...], path: Path,
                   dtype: torch.dtype, batch_size: int) -> None:
    out = torch.zeros(len(src), *shape, dtype=dtype)
    valid = torch.zeros(len(src), dtype=torch.bool)
    pending: list[tuple[int, int, torch.Tensor]] = []

    def flush():
        if pending:
            rows, crops = [i for i, _, _ in pending], [k for _, k, _ in pending]
            out[rows, crops] = encode(torch.stack([x for _, _, x in pending])).to("cpu", dtype)
            valid[rows] = True
            pending.clear()

    for i in tqdm(range(len(src)), desc=f"prep: encoding {name}", leave=False, disable=None):
        rec = src[i]
        if rec is not None:
            pending += [(i, k, transform(rec.image, i, k)) for k in range(shape[0])]
        if len(pending) >= batch_size:
            flush()
    flush()
    with atomic_path(path) as tmp:
        torch.save({name: out, "valid": valid}, tmp)
