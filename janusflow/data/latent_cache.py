"""Latent cache: every generation image encoded once by the (frozen) codec.

Gen images are centre-cropped when the cache is on (a random crop would need a new encode each
time). The cache is one tensor file per source, named by a hash of the source and the codec.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from janusflow.data.sources import gen_transform


class LatentCache:
    def __init__(self, latents: list[torch.Tensor], valid: list[torch.Tensor]):
        self.latents, self.valid = latents, valid

    def get(self, source: int, index: int) -> torch.Tensor | None:
        return self.latents[source][index] if bool(self.valid[source][index]) else None

    @classmethod
    def build(cls, sources: list, codec, image_size: int, paths: list[Path], batch_size: int = 64) -> LatentCache:
        latents, valid = [], []
        for src, path in zip(sources, paths):
            if not path.exists():
                _encode_source(src, codec, image_size, path, batch_size)
            data = torch.load(path, weights_only=True)
            latents.append(data["latents"])
            valid.append(data["valid"])
        return cls(latents, valid)


@torch.no_grad()
def _encode_source(src, codec, image_size: int, path: Path, batch_size: int) -> None:
    shape = codec.latent_shape(image_size)
    out = torch.zeros(len(src), *shape)
    valid = torch.zeros(len(src), dtype=torch.bool)
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        if pending:
            idx = [i for i, _ in pending]
            out[idx] = codec.encode(torch.stack([x for _, x in pending])).float().cpu()
            valid[idx] = True
            pending.clear()

    for i in tqdm(range(len(src)), desc="prep: encoding latents", leave=False, disable=None):
        rec = src[i]
        if rec is not None:
            pending.append((i, gen_transform(rec.image, image_size, None)))
        if len(pending) == batch_size:
            flush()
    flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save({"latents": out, "valid": valid}, tmp)
    os.replace(tmp, path)
