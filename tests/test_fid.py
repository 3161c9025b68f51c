"""FID against a reference folder (janusflow.eval.fid, tools/fid.py): the formula by hand, categories, local weights."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from janusflow.eval.fid import FIDError, folder_fid, image_files, inception_extractor
from tests.test_pipeline import load_tool


class ChannelMoments(nn.Module):
    """A stand-in feature extractor: per-channel mean and standard deviation of uint8 [B, 3, H, W] -> [B, 6]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = x.double().flatten(2)
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def hand_features(path) -> np.ndarray:
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3)
    return np.concatenate([x.mean(0), x.std(0, ddof=1)])


def hand_fid(files_a, files_b) -> float:
    a, b = np.stack([hand_features(f) for f in files_a]), np.stack([hand_features(f) for f in files_b])
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real))


def write_images(folder, n, rng, brightness, size=8, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.clip(rng.normal(brightness, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}{suffix}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """real/ and fake/, each with categories "animals" and "plants" (10 images each, two sizes, a JPEG) plus noise."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    for side, shift in (("real", 0), ("fake", 30)):
        write_images(root / side / "animals", 8, rng, 100 + shift)
        write_images(root / side / "animals", 2, rng, 100 + shift, size=12, suffix=".jpg")
        write_images(root / side / "plants", 10, rng, 150 - shift)
        (root / side / "plants" / "notes.txt").write_text("not an image")
        (root / side / "plants" / ".000.png.tmp").write_bytes(b"an interrupted write")
    write_images(root / "real" / "logo", 3, rng, 50)  # a category only the real side has
    return root


def test_fid_matches_the_formula_by_hand_overall_and_per_category(folders):
    real, fake = folders / "real", folders / "fake"
    scores = folder_fid(real, fake, ChannelMoments(), per_category=True, batch_size=4)
    assert set(scores) == {"fid", "fid/animals", "fid/plants", "num_real", "num_fake"}
    assert scores["num_real"] == 23 and scores["num_fake"] == 20
    assert scores["fid"] == pytest.approx(hand_fid(image_files(real), image_files(fake)), rel=1e-6)
    for category in ("animals", "plants"):
        pattern = "*.[pj][np]g"  # .png and .jpg
        expected = hand_fid(sorted((real / category).glob(pattern)), sorted((fake / category).glob(pattern)))
        assert scores[f"fid/{category}"] == pytest.approx(expected, rel=1e-6)
    assert scores["fid/animals"] > 100  # the brightness shift shows, so the comparison is not vacuous
    whole_batches = folder_fid(real, fake, ChannelMoments(), batch_size=100)
    assert whole_batches["fid"] == pytest.approx(scores["fid"], rel=1e-9) and "fid/animals" not in whole_batches


def test_same_folder_scores_zero(folders):
    assert abs(folder_fid(folders / "real", folders / "real", ChannelMoments())["fid"]) < 1e-6


def test_errors_name_the_folder_or_file(folders, tmp_path):
    with pytest.raises(FIDError, match="nowhere is not a folder of images"):
        folder_fid(tmp_path / "nowhere", folders / "fake", ChannelMoments())
    write_images(tmp_path / "one", 1, np.random.default_rng(1), 100)
    with pytest.raises(FIDError, match="holds 1 images; FID needs at least 2"):
        folder_fid(tmp_path / "one", folders / "fake", ChannelMoments())
    write_images(tmp_path / "flat", 3, np.random.default_rng(1), 100)
    with pytest.raises(FIDError, match="no category subfolder holds 2 or more images in both"):
        folder_fid(tmp_path / "flat", folders / "fake", ChannelMoments(), per_category=True)
    (tmp_path / "flat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(FIDError, match="cannot read image .*broken.png"):
        folder_fid(tmp_path / "flat", folders / "fake", ChannelMoments())
    with pytest.raises(FIDError, match="Inception weights .*missing.pth not found"):
        inception_extractor(tmp_path / "missing.pth")
    (tmp_path / "cut.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FIDError, match="cannot load Inception weights from .*cut.pth"):
        inception_extractor(tmp_path / "cut.pth")


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weight file in the FID Inception's format (random values): the real network, loaded from a path."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    with pytest.MonkeyPatch.context() as mp:  # build the network without its download, to get its keys and shapes
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save({k: v.half() for k, v in network.state_dict().items()}, path)
    return path


def test_inception_from_a_local_file_and_the_cli(folders, random_inception_weights, tmp_path, monkeypatch, capsys):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    rng = np.random.default_rng(2)
    real, fake, out = tmp_path / "real", tmp_path / "fake", tmp_path / "fid.json"
    write_images(real, 3, rng, 100)
    write_images(fake, 3, rng, 160)
    main = load_tool("fid.py").main
    assert main(["--real", str(real), "--fake", str(fake), "--inception", str(random_inception_weights),
                 "--out", str(out), "--device", "cpu"]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert scores["num_real"] == scores["num_fake"] == 3 and scores["fid"] > 0
    assert "fid " in capsys.readouterr().out
    assert main(["--real", str(real), "--fake", str(real), "--inception", str(tmp_path / "none.pth")]) == 2
    assert "fid.py: error: Inception weights" in capsys.readouterr().err
