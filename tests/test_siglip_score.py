"""The SigLIP image-text score: the prep keeps both towers (with a cache key that changed with the format), a
trained judge prefers matching captions, and the evaluation runner reports the score."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from janusflow.config import CodecConfig, load_recipe, model_config
from janusflow.data.shapes import write_shapes_dataset
from janusflow.data.transforms import siglip_view
from janusflow.eval import runner
from janusflow.eval.siglip_score import SigLIPJudge
from janusflow.export import export_model
from janusflow.models.codec import LatentCodec
from janusflow.models.janusflow import JanusFlow
from janusflow.models.siglip_text import TEXT_TOWER_FILE
from janusflow.tokenizer import ByteTokenizer
from janusflow.train import prep
from tests.conftest import randomize

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _trained_judge(tmp_path) -> SigLIPJudge:
    """The prep's SigLIP training and saving on four solid colours with their names, loaded back from disk."""
    und = load_recipe("tiny").model.und_encoder
    images = [Image.new("RGB", (und.image_size, und.image_size), c) for c in COLOURS.values()]
    x = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    captions = [f"a {c} picture" for c in COLOURS]
    tower, text_side, losses = prep.train_siglip(siglip_view((x + 1) / 2, und), captions, und, steps=80, batch_size=8,
                                                 lr=3e-3)
    assert losses[-1] < losses[0] / 5
    tmp_path.mkdir(parents=True, exist_ok=True)
    prep.save_siglip(tmp_path, tower, text_side, und, losses)
    return SigLIPJudge.from_dir(tmp_path), images


def test_a_trained_judge_scores_matching_captions_above_mismatched_ones(tmp_path):
    judge, images = _trained_judge(tmp_path)
    captions = [f"a {c} picture" for c in COLOURS]
    matrix = torch.stack([judge.pair_cosines(images, captions[i:] + captions[:i]) for i in range(len(captions))])
    # Row 0 pairs image j with its own caption; every other row pairs it with another colour's.
    assert (matrix[0] > matrix[1:].max(dim=0).values + 0.1).all()
    right, wrong = judge.score(images, captions), judge.score(images, captions[1:] + captions[:1])
    assert right["siglip_score"] > wrong["siglip_score"] + 0.3
    assert right["siglip_cosine"] == pytest.approx(matrix[0].mean().item(), abs=1e-6)
    assert 0.0 <= wrong["siglip_score"] < right["siglip_score"] <= 1.0
    with pytest.raises(ValueError, match="captions"):
        judge.score(images, captions[:2])


def test_prep_keeps_the_text_tower_under_a_new_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "_cache"))
    recipe = load_recipe("tiny", [f"run_dir={tmp_path / 'run'}", "prep.siglip_steps=2", "prep.siglip_batch_size=8"])
    out = prep.prepare(recipe, log=lambda *_: None)
    folder = tmp_path / "_cache" / out["siglip_dir"].split("/")[-1]
    assert out["und_encoder_path"] == str(folder / "siglip.pt") and (folder / TEXT_TOWER_FILE).exists()
    judge = SigLIPJudge.from_dir(folder)
    saved = torch.load(folder / "siglip.pt", weights_only=True)
    assert all(torch.equal(judge.vision.state_dict()[k], v) for k, v in saved.items())
    # A folder of the old format (vision tower only) is never reused: the format is part of its key.
    monkeypatch.setattr(prep, "SIGLIP_FORMAT", 1)
    assert prep.prepare(recipe, log=lambda *_: None)["siglip_dir"] != out["siglip_dir"]
    (folder / TEXT_TOWER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=TEXT_TOWER_FILE):
        SigLIPJudge.from_dir(folder)


def test_runner_reports_the_siglip_score_and_only_the_asked_tasks(tmp_path):
    judge, _ = _trained_judge(tmp_path / "judge")
    torch.manual_seed(0)
    model = randomize(JanusFlow(model_config("tiny")), std=0.05)
    export = export_model(tmp_path / "export", model, LatentCodec.from_config(CodecConfig(preset="tiny")),
                          ByteTokenizer(), "")
    data = write_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=8, image_size=32, max_objects=2, seed=0)
    kwargs = dict(num_geneval_per_category=1, num_fd_images=4, num_vqa=2, num_rf_images=2, steps=2, batch_size=4)
    gen = runner.evaluate_export(export, data, siglip_dir=tmp_path / "judge", tasks=("gen",), **kwargs)
    assert {"fd", "siglip_score", "siglip_cosine", "rf_val", "geneval/overall"} <= set(gen) and "vqa_acc" not in gen
    assert 0.0 <= gen["siglip_score"] <= 1.0 and -1.0 <= gen["siglip_cosine"] <= 1.0
    assert all(math.isfinite(v) for v in gen.values())
    assert set(runner.evaluate_export(export, data, tasks=("und",), **kwargs)) == {"vqa_acc"}
    with pytest.raises(ValueError, match="tasks"):
        runner.evaluate_export(export, data, tasks=("text",), **kwargs)
