"""FID between a folder of reference images and a folder of generated ones, overall and per category.

The metric is torchmetrics' ``FrechetInceptionDistance``: it accumulates feature sums and products in float64
(30k images in constant memory), computes the Frechet distance from them, and its Inception is torch-fidelity's
port of the TF FID network (``weights-inception-2015-12-05-6726825d.pth``: the 2015-12-05 graph of the original
FID, which pytorch-fid and clean-fid port too), loaded from a local path here, so nothing is downloaded.
torchmetrics also takes any ``nn.Module`` as the feature extractor, which lets the tests check the whole path
with a small one.

Images: every .png / .jpg / .jpeg / .webp / .bmp file under a folder (recursively, hidden names skipped), read
as RGB uint8 at its own size [B, 3, H, W]; the Inception resizes them to 299 x 299 with the TF1-compatible
bilinear resize of the original FID (``antialias=False``) and returns [B, 2048] pool features.
Categories (MJHQ-30K): the first-level subfolders present in both folders, each scored on its own.

    extractor = inception_extractor("weights-inception-2015-12-05-6726825d.pth")
    scores = folder_fid("mjhq30k_imgs", "mjhq_images", extractor, per_category=True)
    # {"fid": ..., "fid/animals": ..., ..., "num_real": 30000, "num_fake": 30000}
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


class FIDError(ValueError):
    """A missing or unreadable folder, image or weight file: the message names it."""


class PassThrough(nn.Module):
    """The 'feature extractor' of the accumulating metrics: their inputs already are features [B, D]."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def inception_extractor(weights: str | Path) -> nn.Module:
    """The FID Inception-v3 (uint8 [B, 3, H, W] -> [B, 2048]) with weights read from ``weights``."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if not Path(weights).is_file():
        raise FIDError(f"Inception weights {weights} not found: pass the FID Inception file ({INCEPTION_FILE}, "
                       f"from {INCEPTION_URL})")
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=str(weights), antialias=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise FIDError(f"cannot load Inception weights from {weights}: {str(e).splitlines()[0]}") from None


def image_files(folder: str | Path) -> list[Path]:
    """The images under ``folder``, sorted by path (so a category's files are contiguous)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if len(files) < 2:
        raise FIDError(f"{folder} holds {len(files)} images; FID needs at least 2")
    return files


def category_of(path: Path, root: Path) -> str | None:
    """The first-level subfolder holding ``path``, or None for a file directly in ``root``."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def read_uint8(path: Path) -> np.ndarray:
    """An image as RGB uint8 [H, W, 3]."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError):
        raise FIDError(f"cannot read image {path}") from None


def image_batches(files: Sequence[Path], batch_size: int) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """(files, uint8 [B, 3, H, W]) batches of consecutive files of one size."""
    paths: list[Path] = []
    arrays: list[np.ndarray] = []
    for path in files:
        array = read_uint8(path)
        if arrays and (array.shape != arrays[0].shape or len(arrays) == batch_size):
            yield paths, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            paths, arrays = [], []
        paths.append(path)
        arrays.append(array)
    if arrays:
        yield paths, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def accumulate(metrics: dict[str | None, nn.Module], root: Path, files: Sequence[Path], extractor: nn.Module,
               real: bool, batch_size: int, device: torch.device) -> None:
    """Add the features of ``files`` to metrics[None] (overall) and to the metric of each file's category."""
    with tqdm(total=len(files), desc="real" if real else "generated", unit="image") as bar:
        for paths, batch in image_batches(files, batch_size):
            features = extractor(batch.to(device)).double()
            metrics[None].update(features, real=real)
            categories = [category_of(p, root) for p in paths]
            for category in set(categories) & set(metrics) - {None}:
                metrics[category].update(features[[c == category for c in categories]], real=real)
            bar.update(len(paths))


def folder_fid(real: str | Path, fake: str | Path, extractor: nn.Module, *, per_category: bool = False,
               batch_size: int = 50, device: str | torch.device = "cpu") -> dict[str, float]:
    """{"fid", "num_real", "num_fake"} and with ``per_category`` one "fid/<category>" per shared subfolder."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake, device = Path(real), Path(fake), torch.device(device)
    real_files, fake_files = image_files(real), image_files(fake)
    categories = shared_categories(real, real_files, fake, fake_files) if per_category else []
    num_features = extractor_width(extractor, real_files[0], device)
    metrics = {name: FrechetInceptionDistance(feature=PassThrough(num_features)).to(device)
               for name in [None, *categories]}
    extractor = extractor.to(device).eval()
    accumulate(metrics, real, real_files, extractor, True, batch_size, device)
    accumulate(metrics, fake, fake_files, extractor, False, batch_size, device)
    scores = {"fid": float(metrics[None].compute())}
    scores.update({f"fid/{c}": float(metrics[c].compute()) for c in categories})
    return {**scores, "num_real": len(real_files), "num_fake": len(fake_files)}


def shared_categories(real: Path, real_files: Sequence[Path], fake: Path, fake_files: Sequence[Path]) -> list[str]:
    """Subfolders with at least 2 images on both sides; an error when there is none."""
    def counts(root: Path, files: Sequence[Path]) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in files:
            if (c := category_of(f, root)) is not None:
                out[c] = out.get(c, 0) + 1
        return out

    r, f = counts(real, real_files), counts(fake, fake_files)
    shared = sorted(c for c in set(r) & set(f) if r[c] >= 2 and f[c] >= 2)
    if not shared:
        raise FIDError(f"no category subfolder holds 2 or more images in both {real} and {fake}")
    return shared


@torch.no_grad()
def extractor_width(extractor: nn.Module, sample: Path, device: torch.device) -> int:
    """Feature size D of the extractor, from one image."""
    image = torch.from_numpy(read_uint8(sample)).permute(2, 0, 1)[None]
    return int(extractor.to(device).eval()(image.to(device)).shape[-1])
