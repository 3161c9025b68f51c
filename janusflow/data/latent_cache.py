"""Per-record caches of generation data: latents (the frozen codec) and REPA targets (the frozen SigLIP).

Gen images are centre-cropped when the caches are on (a random crop would need a new encode each
time), and both caches see that same crop, so a record's cached latent and its cached REPA target
correspond exactly. A cache is one tensor file per source, named by a hash of the source and of what
encoded it (for REPA, a digest of the encoder's weights: a changed encoder never reads stale features).
Files are memory-mapped, so data-loader workers share one copy.

    latents = build_latent_cache(sources, codec, 384, paths)
    latents.get(source=0, index=17)   # [C, h, w], or None for a record that could not be read
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from janusflow.config import UndEncoderConfig
from janusflow.data.mixture import repa_pixels
from janusflow.data.sources import gen_transform


class RecordCache:
    """One tensor per record of each source (``values[source][index]``), None where a record was broken."""

    def __init__(self, values: list[torch.Tensor], valid: list[torch.Tensor]):
        self.values, self.valid = values, valid

    def has(self, source: int, index: int) -> bool:
        return bool(self.valid[source][index])

    def get(self, source: int, index: int) -> torch.Tensor | None:
        return self.values[source][index].float() if self.has(source, index) else None

    @classmethod
    def build(cls, name: str, sources: list, encode: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
              shape: tuple[int, ...], paths: list[Path], dtype: torch.dtype = torch.float32,
              batch_size: int = 64) -> RecordCache:
        """Load each source's file (``{name: values, "valid": mask}``), first writing it when absent:
        ``values[i] = encode(transform(image_i))``, batched."""
        values, valid = [], []
        for src, path in zip(sources, paths):
            if not path.exists():
                _encode_source(name, src, encode, transform, shape, path, dtype, batch_size)
            data = torch.load(path, weights_only=True, mmap=True)
            values.append(data[name])
            valid.append(data["valid"])
        return cls(values, valid)


def build_latent_cache(sources: list, codec, image_size: int, paths: list[Path]) -> RecordCache:
    """Scaled codec latents [C, h, w] of every centre-cropped gen image (fp32)."""
    return RecordCache.build("latents", sources, codec.encode, lambda img: gen_transform(img, image_size, None),
                             codec.latent_shape(image_size), paths)


def build_repa_cache(sources: list, encoder: nn.Module, und_cfg: UndEncoderConfig, image_size: int,
                     paths: list[Path]) -> RecordCache:
    """SigLIP patch features [N, width] of every centre-cropped gen image: REPA's target, computed exactly
    as the live path does, stored in fp16 (half the disk of fp32; ~5e-4 relative rounding)."""
    device = next(encoder.parameters()).device

    def transform(img):
        return repa_pixels(gen_transform(img, image_size, None), und_cfg)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return encoder(x.to(device, next(encoder.parameters()).dtype))

    shape = ((und_cfg.image_size // und_cfg.patch_size) ** 2, und_cfg.width)
    return RecordCache.build("features", sources, encode, transform, shape, paths, dtype=torch.float16)


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
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        if pending:
            idx = [i for i, _ in pending]
            out[idx] = encode(torch.stack([x for _, x in pending])).to("cpu", dtype)
            valid[idx] = True
            pending.clear()

    for i in tqdm(range(len(src)), desc=f"prep: encoding {name}", leave=False, disable=None):
        rec = src[i]
        if rec is not None:
            pending.append((i, transform(rec.image)))
        if len(pending) == batch_size:
            flush()
    flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save({name: out, "valid": valid}, tmp)
    os.replace(tmp, path)
