"""Evaluation: Frechet distance maths, VQA scoring, the evaluation runner on a tiny exported model, and the
REPA comparison's two arms (same data and seeds, only the REPA weight differs)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from janusflow.config import CodecConfig
from janusflow.data.shapes import write_shapes_dataset
from janusflow.eval import metrics, runner
from janusflow.export import export_model
from janusflow.models.codec import LatentCodec
from janusflow.pipeline import load_pipeline
from janusflow.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
EVAL_KWARGS = dict(num_geneval_per_category=2, num_fd_images=12, num_vqa=6, num_rf_images=6, steps=2, batch_size=4)


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # The distance depends on the geometry only: rotating both Gaussians (full covariances) keeps it.
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_samples_match_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) * torch.linspace(0.5, 2.0, 8) + 1.0
    assert abs(metrics.frechet_distance_of(x, x)) < 1e-8
    mu, sigma = metrics.feature_stats(x)
    np.testing.assert_allclose(mu, x.double().mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False))
    # Two large samples of N(0, I) and N(1, 4 I) in 4 dimensions: FD -> 4 * 1 + 4 * (1 - 2)^2 = 8.
    a, b = torch.randn(200_000, 4, generator=g), 1.0 + 2.0 * torch.randn(200_000, 4, generator=g)
    assert metrics.frechet_distance_of(a, b) == pytest.approx(8.0, rel=0.02)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_stats(np.zeros((1, 3)))


# ----------------------------------------------------------------------------- VQA


def test_vqa_accuracy_is_exact_match_after_normalisation():
    assert metrics.normalize_answer("  The Red. ") == "red"
    assert metrics.vqa_accuracy(["Red.", "2", "a circle", "yes"], ["red", "3", "circle", "no"]) == 0.5
    with pytest.raises(ValueError):
        metrics.vqa_accuracy([], [])


# ----------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """An exported tiny model (random, non-trivial weights) and a small shapes dataset."""
    from janusflow.config import model_config
    from janusflow.models.janusflow import JanusFlow
    from tests.conftest import randomize

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = randomize(JanusFlow(model_config("tiny")), std=0.05)
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    export = export_model(root / "export", model, codec, ByteTokenizer(), "")
    data = write_shapes_dataset(root / "shapes", num_train=2, num_val=16, image_size=32, max_objects=2, seed=0)
    return export, data


def test_evaluate_export_returns_every_metric_finite_and_is_deterministic(tiny_export):
    export, data = tiny_export
    first = runner.evaluate_export(export, data, seed=3, **EVAL_KWARGS)
    categories = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")
    times = [f"rf_val/t={t:g}" for t in metrics.RF_VAL_TIMES]
    assert set(first) == {f"geneval/{c}" for c in categories} | {"fd", "vqa_acc", "rf_val", *times}
    assert all(math.isfinite(v) for v in first.values())
    assert all(0.0 <= first[k] <= 1.0 for k in first if k.startswith("geneval/") or k == "vqa_acc")
    assert first["fd"] > 0 and first["rf_val"] > 0
    assert first["rf_val"] == pytest.approx(np.mean([first[k] for k in times]))
    assert runner.evaluate_export(export, data, seed=3, **EVAL_KWARGS) == first
    other = runner.evaluate_export(export, data, seed=4, **EVAL_KWARGS)
    assert other["rf_val"] != first["rf_val"] and other["fd"] != first["fd"]


def test_batched_answers_equal_the_pipeline_answers(tiny_export):
    export, data = tiny_export
    pipe = load_pipeline(export)
    items = runner.load_eval_data(data, num_images=4, num_vqa=5).vqa
    single = [pipe.answer(image, q, max_new_tokens=runner.VQA_MAX_NEW_TOKENS) for image, q, _ in items]
    assert runner.answer_batch(pipe, [(image, q) for image, q, _ in items], batch_size=3) == single
    assert any(single)  # random weights still say something, so the comparison is not vacuous


def test_rf_val_loss_does_not_depend_on_batching_and_fd_of_real_images_with_themselves_is_zero(tiny_export):
    export, data = tiny_export
    pipe = load_pipeline(export)
    held_out = runner.load_eval_data(data, num_images=10, num_vqa=1)
    latents, ids, mask = runner.gen_latents_and_prompts(held_out.images, held_out.captions, pipe.codec,
                                                        pipe.tokenizer, pipe.model.config.gen_image_size)
    assert ids.shape[0] == latents.shape[0] == 10 and (mask.sum(1) < ids.shape[1]).any()  # some rows are padded
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    whole = metrics.rf_val_loss(pipe.model, latents, ids, mask, noise, batch_size=64)
    pieces = metrics.rf_val_loss(pipe.model, latents, ids, mask, noise, batch_size=3)
    assert whole == pytest.approx(pieces, rel=1e-5)
    und = pipe.model.config.und_encoder
    feats = metrics.encoder_features(pipe.model.vision_und_enc_model, held_out.images, und)
    assert feats.shape == (10, und.width)
    assert abs(metrics.frechet_distance_of(feats, feats)) < 1e-6


# ----------------------------------------------------------------------------- REPA comparison


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_repa", ROOT / "tools" / "compare_repa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_to_reach_and_speedup_table():
    compare = _compare_module()
    steps = [0, 100, 200, 300]
    assert compare.steps_to_reach(steps, [9.0, 6.0, 4.0, 5.0], 5.0, lower_is_better=True) == 200
    assert compare.steps_to_reach(steps, [0.0, 0.1, 0.3, 0.2], 0.25, lower_is_better=False) == 200
    assert compare.steps_to_reach(steps, [9.0, 8.0, 7.0, 6.0], 5.0, lower_is_better=True) is None


def test_compare_repa_arms_share_start_data_and_seeds_and_differ_only_in_the_repa_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "_cache"))
    compare = _compare_module()
    eval_kwargs = {**EVAL_KWARGS, "cfg_weight": 2.0, "seed": 0}
    out = tmp_path / "cmp"
    summary = compare.compare_repa("tiny", [], out, steps=2, eval_every=1, eval_kwargs=eval_kwargs)
    assert summary["recipe_diff"] == {"stages.1.repa_weight": [1.0, 0.0]}
    rows = {arm: compare.read_rows(out / arm / "metrics.jsonl") for arm in compare.ARMS}
    assert all(r["stage"] == "pretrain" for arm in rows for r in rows[arm])  # stage 1 ran once, in shared/
    train = {arm: {r["step"]: r for r in rows[arm] if "loss_rf" in r} for arm in rows}
    assert train["repa-on"][1]["loss_rf"] == train["repa-off"][1]["loss_rf"]  # same start, batch, noise and t
    assert "loss_repa" in train["repa-on"][1] and "loss_repa" not in train["repa-off"][1]
    evals = {arm: {r["step"]: r for r in rows[arm] if "eval/fd" in r} for arm in rows}
    assert sorted(evals["repa-on"]) == sorted(evals["repa-off"]) == [0, 1, 2]
    assert evals["repa-on"][0] | {"time": 0} == evals["repa-off"][0] | {"time": 0}  # the shared step-0 evaluation
    assert evals["repa-on"][2]["eval/rf_val"] != evals["repa-off"][2]["eval/rf_val"]
    for name in ("compare_repa.png", "compare_repa.md", "compare_repa.json"):
        assert (out / name).stat().st_size > 0
    assert "stages.1.repa_weight" in (out / "compare_repa.md").read_text()
