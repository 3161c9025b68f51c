"""Every image -> tensor step (janusflow.data.transforms): the paper's generation crop, SigLIP's input pinned to
the official VLMImageProcessor's steps, REPA's view of a crop equal to SigLIP's input of the same crop."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from janusflow.config import UndEncoderConfig, model_config
from janusflow.data.transforms import gen_crop, gen_pixels, letterbox, siglip_pixels, siglip_view, und_pixels

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def official_processor(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """The official VLMImageProcessor (janus/janusflow/models/image_processing_vlm.py) step by step, written out
    independently: resize the long side with int() truncation (min 14) bicubic with antialias, expand2square on
    the mean colour, rescale 1/255, normalise."""
    w, h = image.size
    long = max(w, h)
    nw, nh = max(int(w / long * size), 14), max(int(h / long * size), 14)
    resized = image.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    side = max(nw, nh)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    square.paste(resized, ((side - nw) // 2, (side - nh) // 2))
    x = np.asarray(square).astype(np.float32) * (1 / 255)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, mean, std", [(32, (0.5,) * 3, (0.5,) * 3), (40, CLIP_MEAN, CLIP_STD)])
@pytest.mark.parametrize("w, h", [(64, 32), (10, 40), (48, 48), (7, 100)])
def test_siglip_pixels_are_the_official_processors(size, mean, std, w, h):
    und = UndEncoderConfig(image_size=size, patch_size=8, image_mean=list(mean), image_std=list(std))
    image = _noise_image(w, h)
    torch.testing.assert_close(siglip_pixels(image, und), official_processor(image, size, mean, std),
                               rtol=0, atol=1e-6)


def test_letterbox_pads_with_the_mean_colour():
    padded = np.asarray(letterbox(Image.new("RGB", (64, 32), (255, 0, 0)), 32, (0.5, 0.5, 0.5)))
    assert padded.shape == (32, 32, 3)
    assert (padded[:8] == 127).all() and (padded[24:] == 127).all()  # int(0.5 * 255) above and below
    assert (padded[8:24] == [255, 0, 0]).all()


def test_gen_crop_resizes_the_short_side_and_crops():
    img = Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (100, 1, 3)))
    a, b = gen_crop(img, 64, random.Random(0)), gen_crop(img, 64, random.Random(0))
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8 and torch.equal(a, b)
    crops = {int(gen_crop(img, 64, random.Random(s))[0, 0, 0]) for s in range(20)}
    assert len(crops) > 5  # the horizontal crop offset varies (short side 100 -> 64, long side 200 -> 128)
    assert float(gen_pixels(gen_crop(img, 64))[0, 0, 32]) == pytest.approx(0.0, abs=0.03)  # the ramp's middle
    solid = gen_pixels(gen_crop(Image.new("RGB", (20, 30), (255, 0, 0)), 32, random.Random(1)))
    assert torch.equal(solid, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32))


@pytest.mark.parametrize("gen_size", [32, 48])
def test_repa_view_of_a_crop_is_siglips_input_of_that_crop(gen_size):
    """REPA aligns with SigLIP's features of the generation crop: the tensor path (no PIL round trip) gives the
    official processor's pixels of the cropped image; exactly when no resize is needed."""
    und = UndEncoderConfig(image_size=32, patch_size=8)
    crop = gen_crop(_noise_image(50, 40, seed=3), gen_size, random.Random(2))
    official = siglip_pixels(Image.fromarray(crop.permute(1, 2, 0).numpy()), und)
    view = siglip_view(crop, und)
    assert view.shape == (3, 32, 32)
    if gen_size == und.image_size:
        assert torch.equal(view, official)
    else:  # torchvision's antialiased bicubic on the tensor against PIL's on the image
        assert (view - official).abs().mean() < 0.02
    batch = siglip_view(torch.stack([crop, crop]), und)
    assert torch.equal(batch[1], view)


def test_und_pixels_follow_the_understanding_encoder_kind():
    image = _noise_image(30, 20)
    siglip = model_config("tiny")
    torch.testing.assert_close(und_pixels(image, siglip), siglip_pixels(image, siglip.und_encoder), rtol=0, atol=0)
    vae = model_config("tiny", und_encoder_kind="shared_gen", gen_image_size=48)
    x = und_pixels(image, vae)
    assert x.shape == (3, 48, 48) and x.min() >= -1 and x.max() <= 1  # the VAE's range, at the generation size
    torch.testing.assert_close(x, official_processor(image, 48, (0.5,) * 3, (0.5,) * 3), rtol=0, atol=1e-6)
