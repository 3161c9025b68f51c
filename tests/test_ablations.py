"""The paper's ablations: the VAE understanding encoders of arms B and C (shapes, gradients, freeze policies,
checkpoints), the six ablation recipes (they differ from F only in their ablation) and the results table."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from janusflow.config import CodecConfig, MixturePhase, TimeSamplingConfig, load_recipe, model_config, to_dict
from janusflow.data.mixture import MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.data.shapes import write_shapes_dataset
from janusflow.data.sources import open_source
from janusflow.models.codec import LatentCodec
from janusflow.models.janusflow import JanusFlow
from janusflow.models.und_inputs import num_und_tokens, und_encoder_inputs
from janusflow.tokenizer import ByteTokenizer
from janusflow.train.losses import TrainModule
from janusflow.train.stages import apply_freeze_policy
from tests.conftest import randomize

ROOT = Path(__file__).resolve().parent.parent
VAE_KINDS = ("shared_gen", "separate_gen")


def _model(kind: str) -> JanusFlow:
    torch.manual_seed(0)
    return randomize(JanusFlow(model_config("tiny", und_encoder_kind=kind)))


def _codec() -> LatentCodec:
    torch.manual_seed(0)
    return LatentCodec.from_config(CodecConfig(preset="tiny"))


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- the encoder kinds


@pytest.mark.parametrize("kind", VAE_KINDS)
def test_vae_understanding_encoder_shapes_time_and_gradients(kind):
    model, codec = _model(kind), _codec()
    cfg = model.config
    pixels = torch.rand(2, 3, cfg.gen_image_size, cfg.gen_image_size) * 2 - 1
    latents = und_encoder_inputs(pixels, cfg, codec)
    assert latents.shape == (2, *codec.latent_shape(cfg.gen_image_size))
    n = num_und_tokens(cfg, latents.shape[2:])
    assert n == model.num_gen_tokens(latents.shape[2:]) == 64  # 16x16 latents, 2x2 patches
    images = model.encode_und_images(latents)
    assert images.shape == (2, 1 + n, cfg.llm.hidden_size)
    # The clean image is the t = 1 end of the flow: the encoder sees t * 1000 = 1000.
    encoder = model.vision_gen_enc_model if kind == "shared_gen" else model.vision_und_gen_enc_model
    aligner = model.vision_gen_enc_aligner if kind == "shared_gen" else model.vision_und_gen_enc_aligner
    x, _, _ = encoder(latents, torch.full((2,), 1000.0))
    torch.testing.assert_close(images[:, 1:], aligner(x.flatten(2).transpose(1, 2)))
    x0, _, _ = encoder(latents, torch.zeros(2))
    assert not torch.allclose(images[:, 1:], aligner(x0.flatten(2).transpose(1, 2)))

    ids = torch.randint(0, 256, (2, 4 + 1 + n))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2:3 + n] = True
    out = model.forward_und(ids, torch.ones_like(ids), latents, mask, labels=ids)
    assert out.logits.shape == (2, ids.shape[1], cfg.llm.vocab_size)
    out.loss.backward()
    assert _grad_norm(encoder) > 0 and _grad_norm(aligner) > 0 and _grad_norm(model.language_model) > 0
    # Nothing of SigLIP's path is used by a VAE understanding encoder.
    assert _grad_norm(model.vision_und_enc_model) == 0 and _grad_norm(model.vision_und_enc_aligner) == 0
    if kind == "separate_gen":  # the generation encoder gets no gradient from the understanding loss
        assert _grad_norm(model.vision_gen_enc_model) == 0 and _grad_norm(model.vision_gen_enc_aligner) == 0


def test_siglip_default_keeps_its_keys_and_init_and_separate_adds_only_its_encoder():
    siglip, shared, separate = _model_raw("siglip"), _model_raw("shared_gen"), _model_raw("separate_gen")
    base = siglip.state_dict()
    assert shared.state_dict().keys() == base.keys()
    extra = set(separate.state_dict()) - set(base)
    assert {k.split(".")[0] for k in extra} == {"vision_und_gen_enc_model", "vision_und_gen_enc_aligner"}
    assert set(base) <= set(separate.state_dict())
    # Built last, the extra encoder leaves the initialisation of every official tensor unchanged.
    assert all(torch.equal(separate.state_dict()[k], v) for k, v in base.items())


def _model_raw(kind: str) -> JanusFlow:
    torch.manual_seed(0)
    return JanusFlow(model_config("tiny", und_encoder_kind=kind))


@pytest.mark.parametrize("kind", VAE_KINDS)
def test_vae_kind_round_trips_through_save_pretrained(kind, tmp_path):
    model = _model(kind)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["janusflow_und_encoder_kind"] == kind
    loaded = JanusFlow.from_pretrained(tmp_path)
    assert loaded.config.und_encoder_kind == kind
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("policy", ["stage1", "stage2", "stage3"])
@pytest.mark.parametrize("kind", VAE_KINDS)
def test_freeze_policies_train_the_vae_understanding_encoder_and_never_siglip(kind, policy, tmp_path):
    model = _model(kind).train()
    trainable = set(apply_freeze_policy(model, policy))
    tops = {n.split(".")[0] for n in trainable}
    assert "vision_gen_enc_model" in tops and "beg_of_und_embed" in tops
    assert not tops & {"vision_und_enc_model", "vision_und_enc_aligner"}  # SigLIP: REPA's frozen target only
    if kind == "separate_gen":
        assert {"vision_und_gen_enc_model", "vision_und_gen_enc_aligner"} <= tops
    assert ("language_model" in tops) == (policy != "stage1")
    # One optimizer step on a mixed batch (und images as VAE latents) changes exactly the trainable tensors.
    module = TrainModule(model, repa_weight=1.0, repa_layer=1, repa_hidden=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    out = module(_vae_batch(kind, tmp_path))
    assert math.isfinite(out["loss_und"].item()) and "loss_repa" in out
    out["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def _vae_batch(kind: str, tmp_path: Path):
    """A mixed micro-batch of the tiny recipe with und:gen:text = 1:2:1, prepared as the trainer does."""
    recipe = load_recipe("tiny", [f"model.und_encoder_kind={kind}"])
    data = write_shapes_dataset(tmp_path / "shapes", num_train=24, num_val=4, image_size=32, max_objects=2, seed=0)
    codec = _codec()
    n = num_und_tokens(recipe.model, codec.latent_shape(recipe.model.gen_image_size)[1:])
    builder = SampleBuilder(ByteTokenizer(), recipe.model, recipe.data, "", n)
    sources = {"und": [open_source(f"{data}/und_train.json", "llava_json")],
               "gen": [open_source(f"{data}/gen_train.jsonl", "caption_jsonl")],
               "text": [open_source(f"{data}/text_train.jsonl", "text_jsonl")]}
    stream = MixtureStream(sources, builder, MixtureSchedule([MixturePhase(und=1, gen=2, text=1)]), seed=0,
                           cfg_drop_prob=0.1, time_cfg=TimeSamplingConfig())
    batch = next(stream.micro_batches(0, 8, 8)).to_device(torch.device("cpu"), torch.float32, codec, recipe.model)
    assert batch.ar.encoder_inputs.shape[1] == codec.latent_channels  # the VAE latents of the und images
    assert batch.gen.latents.shape[1] == codec.latent_channels and batch.gen.crops.dtype == torch.uint8
    return batch


def test_vae_kind_trains_exports_and_answers(tmp_path, monkeypatch):
    """Stage 1 of the tiny recipe with a separate VAE encoder, then its export answers through the pipeline
    (which loads the VAE even for chat) exactly as the batched evaluation does."""
    from janusflow.eval import runner
    from janusflow.pipeline import load_pipeline
    from janusflow.train.trainer import Trainer

    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "_cache"))
    recipe = load_recipe("tiny", [f"run_dir={tmp_path / 'run'}", "model.und_encoder_kind=separate_gen"])
    recipe.stages = recipe.stages[:1]
    trainer = Trainer(recipe)
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_und"]) for r in rows if "loss_und" in r) and any("loss_und" in r for r in rows)
    pipe = load_pipeline(tmp_path / "run", load_vae=False)
    assert pipe.codec is not None and pipe.model.config.und_encoder_kind == "separate_gen"
    processor = json.loads((tmp_path / "run" / "export" / "processor_config.json").read_text())
    assert processor["num_image_tokens"] == pipe.num_und_tokens() == 64  # VAE latent patches, not SigLIP's 16
    items = runner.load_eval_data(trainer.prep["data_dir"], num_images=2, num_vqa=3).vqa
    single = [pipe.answer(image, q, max_new_tokens=runner.VQA_MAX_NEW_TOKENS) for image, q, _ in items]
    assert runner.answer_batch(pipe, [(image, q) for image, q, _ in items], batch_size=2) == single


# ----------------------------------------------------------------------------- recipes and table


def _ablations_module():
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "tools" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat_diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for k in set(a) | set(b):
            out.update(_flat_diff(a.get(k), b.get(k), f"{prefix}{k}."))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return _flat_diff(dict(enumerate(a)), dict(enumerate(b)), prefix)
    return {} if a == b else {prefix[:-1]: (a, b)}


def test_ablation_recipes_differ_from_f_only_in_their_ablation():
    f = to_dict(load_recipe("ablation-f"))
    expected = {
        "a": {"train.repa.weight": (1.0, 0.0)},
        "b": {"model.und_encoder_kind": ("siglip", "shared_gen")},
        "c": {"model.und_encoder_kind": ("siglip", "separate_gen")},
        "d": {"stages.0.mixture.0.gen": (50.0, 0.0), "stages.1.mixture.0.gen": (50.0, 0.0),
              "stages.1.mixture.1.gen": (80.0, 0.0), "stages.0.max_steps": (100, 50), "stages.1.max_steps": (600, 138),
              "stages.1.mixture.0.until_step": (60, 30)},
        "e": {"stages.0.mixture.0.und": (50.0, 0.0), "stages.1.mixture.0.und": (30.0, 0.0),
              "stages.1.mixture.1.und": (20.0, 0.0), "stages.0.max_steps": (100, 50), "stages.1.max_steps": (600, 474),
              "stages.1.mixture.0.until_step": (60, 42)},
    }
    for arm, diff in expected.items():
        other = to_dict(load_recipe(f"ablation-{arm}"))
        got = {k: v for k, v in _flat_diff(f, other).items() if k != "name"}
        assert got == diff, arm
    assert f["model"]["und_encoder_kind"] == "siglip" and f["train"]["repa"]["weight"] > 0
    assert f["prep"]["siglip_steps"] > 0 and [s["policy"] for s in f["stages"]] == ["stage1", "stage2"]


def test_single_task_arms_see_exactly_fs_data_of_their_task():
    """D and E are data-matched as in the paper: fewer steps, so each sees F's amount of its own task."""
    from janusflow.data.mixture import MixtureSchedule

    def seen(arm: str) -> list[dict[str, float]]:
        return [MixtureSchedule(s.mixture).expected_samples(s.max_steps, s.batch_size)
                for s in load_recipe(f"ablation-{arm}").stages]

    f, d, e = seen("f"), seen("d"), seen("e")
    for stage_f, stage_d, stage_e in zip(f, d, e):
        assert stage_d == {**stage_f, "gen": 0.0} and stage_e == {**stage_f, "und": 0.0}


def test_arm_setups_name_the_paper_columns(tmp_path):
    ablations = _ablations_module()
    setups = {a: ablations.arm_setup(ablations.arm_recipe(a, [], tmp_path)) for a in ablations.ARMS}
    assert [setups[a]["repa"] for a in "abcdef"] == [False, True, True, None, True, True]
    assert [setups[a]["und_encoder"] for a in "abcdef"] == [
        "SigLIP", "VAE + ConvNeXt (shared)", "VAE + ConvNeXt (separate)", "SigLIP", None, "SigLIP"]
    assert [setups[a]["trained_on"] for a in "abcdef"] == ["und + gen"] * 3 + ["und only", "gen only", "und + gen"]
    assert setups["d"]["tasks"] == ["und"] and setups["e"]["tasks"] == ["gen"]
    capped = ablations.arm_recipe("f", [], tmp_path, max_steps=3)
    assert [s.max_steps for s in capped.stages] == [3, 3] and capped.resolved_run_dir == tmp_path / "f"


KWARGS = dict(num_geneval_per_category=8, num_fd_images=128, num_vqa=64, num_rf_images=32, steps=20, cfg_weight=2.0,
              seed=0)
GEN = {"fd": 2.0, "geneval/overall": 0.2, "siglip_score": 0.3, "rf_val": 0.5}


def _fake_records(ablations, tmp_path, fake: dict[str, list[dict]]) -> list[dict]:
    """Records as run_arm writes them, from ``{arm: [results of seed 0, seed 1, ...]}``, seed-major as trained."""
    setups = {a: ablations.arm_setup(ablations.arm_recipe(a, [], tmp_path)) for a in fake}
    seeds = len(next(iter(fake.values())))
    return [{"arm": a, "seed": s, "setup": setups[a], "results": fake[a][s], "seconds": {"train": 60.0, "eval": 10.0}}
            for s in range(seeds) for a in fake]


def _rows(table: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if "---" not in line}
    header = rows.pop("arm") if "arm" in rows else rows.pop("comparison")
    return {name.split(" ↓")[0].split(" ↑")[0]: i for i, name in enumerate(header)}, rows


def test_results_table_and_figure_from_fake_results_over_three_seeds(tmp_path):
    ablations = _ablations_module()
    fake = {"a": [{**GEN, "vqa_acc": v, "fd": fd, "rf_val": 0.6} for v, fd in zip([0.50, 0.52, 0.54], [3.0, 2.0, 3.5])],
            "b": [{**GEN, "vqa_acc": v, "siglip_score": 0.5} for v in (0.30, 0.35, 0.25)],
            "c": [{**GEN, "vqa_acc": 0.35}] * 3,
            "d": [{"vqa_acc": v} for v in (0.62, 0.63, 0.64)],
            "e": [{**GEN, "siglip_score": 0.45}] * 3,
            "f": [{**GEN, "vqa_acc": v, "fd": fd} for v, fd in zip([0.60, 0.62, 0.64], [1.5, 2.5, 1.0])]}
    records = _fake_records(ablations, tmp_path, fake)
    text = ablations.markdown(records, KWARGS)
    col, rows = _rows(text.split("\n\n")[1])  # the title, then the results table
    assert list(rows)[:6] == ["A", "B", "C", "D", "E", "F (JanusFlow)"]
    t2 = 4.302653  # t(0.975, 2)
    assert rows["F (JanusFlow)"][col["VQA acc"]] == f"0.6200 ± {t2 * 0.02 / math.sqrt(3):.4f}"  # sd 0.02
    assert rows["D"][col["VQA acc"]] == f"**0.6300 ± {t2 * 0.01 / math.sqrt(3):.4f}**"  # the best mean, bold
    sd_fd = math.sqrt(sum((v - 5 / 3) ** 2 for v in (1.5, 2.5, 1.0)) / 2)
    assert rows["F (JanusFlow)"][col["FD"]] == f"**1.6667 ± {t2 * sd_fd / math.sqrt(3):.4f}**"  # lower is better
    assert rows["C"][col["VQA acc"]] == "0.3500 ± 0.0000" and rows["E"][col["SigLIP score"]] == "0.4500 ± 0.0000"
    assert rows["D"][col["FD"]] == "n/a" and rows["D"][col["SigLIP score"]] == "n/a" and rows["D"][col["REPA"]] == "-"
    assert rows["E"][col["VQA acc"]] == "n/a" and rows["E"][col["und. encoder"]] == "-"
    assert rows["A"][col["REPA"]] == "no" and rows["B"][col["und. encoder"]] == "VAE + ConvNeXt (shared)"
    assert all(r[col["seeds"]] == "3" for r in rows.values())
    assert "train.seed 0, 1, 2" in text and "95% t-interval over seeds" in text
    # Told apart: paired differences F - X over the 3 seeds.
    section = text.split("## Told apart?")[1].split("\n\n")[1]
    told = {(line.split("|")[1].strip(), line.split("|")[2].strip().split(" ")[0]): [c.strip() for c in
            line.split("|")[3:-1]] for line in section.splitlines()[2:]}
    assert told[("F vs A", "VQA")][0] == "+0.1000 ± 0.0000" and told[("F vs A", "VQA")][2] == "yes: F better"
    assert told[("F vs A", "FD")][2] == "no (interval includes 0)"  # F - A = -1.5, 0.5, -2.5
    assert told[("F vs A", "RF")][2] == "yes: F better"  # 0.5 vs 0.6, lower is better
    assert told[("F vs B", "SigLIP")][2] == "yes: B better"  # 0.3 vs 0.5, higher is better
    assert told[("F vs B", "VQA")][1] == "3" and told[("F vs B", "VQA")][2] == "yes: F better"
    assert "| total | 18 | 1260 | |" in text
    ablations.plot(records, tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_table_of_one_seed_prints_na_for_the_intervals(tmp_path):
    ablations = _ablations_module()
    fake = {"a": [{"vqa_acc": 0.5, **GEN, "fd": 3.0}], "d": [{"vqa_acc": 0.62}], "f": [{"vqa_acc": 0.6, **GEN}]}
    records = _fake_records(ablations, tmp_path, fake)
    text = ablations.markdown(records, KWARGS, real_siglip_score=0.8)
    col, rows = _rows(text.split("\n\n")[1])
    assert list(rows) == ["A", "D", "F (JanusFlow)"]
    assert rows["F (JanusFlow)"][col["FD"]] == "**2.0000 ± n/a (1 seed)**" and rows["D"][col["FD"]] == "n/a"
    assert rows["A"][col["VQA acc"]] == "0.5000 ± n/a (1 seed)"
    section = text.split("## Told apart?")[1]
    assert "| F vs A | VQA acc ↑ | +0.1000 ± n/a (1 seed) | 1 | n/a (1 seed) |" in section
    assert "| F vs B |" not in section  # B did not run
    assert "SigLIP score of 0.8000" in text
    ablations.plot(records, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0


def test_every_arm_runs_once_per_seed_in_its_own_dir_with_train_seed(tmp_path):
    ablations = _ablations_module()
    runs = ablations.seed_recipes("fa", ["train.ema_decay=0.5"], tmp_path, seeds=2, max_steps=3)
    assert list(runs) == [("a", 0), ("f", 0), ("a", 1), ("f", 1)]  # A-F order, all arms of a seed first
    for (arm, seed), recipe in runs.items():
        assert recipe.resolved_run_dir == tmp_path / arm / f"seed-{seed}"
        assert recipe.train.seed == seed and recipe.train.ema_decay == 0.5 and recipe.name == f"ablation-{arm}"
        assert [s.max_steps for s in recipe.stages] == [3, 3]
    assert ablations.parse_args([]).seeds == 3 and ablations.parse_args(["--seeds", "1"]).seeds == 1
    for bad in (["--seeds", "0"], ["train.seed=2"]):
        with pytest.raises(SystemExit):
            ablations.parse_args(bad)


def test_run_arm_trains_and_evaluates_each_seed_once(tmp_path, monkeypatch):
    """With the trainer and the evaluation faked: the wandb run name, the cached record of each seed, its reuse."""
    import janusflow.eval.runner as runner
    import janusflow.train.trainer as trainer

    ablations = _ablations_module()
    trained, evaluated = [], []

    class FakeTrainer:
        def __init__(self, recipe, group=None, run_name=None):
            self.recipe, self.group, self.run_name = recipe, group, run_name

        def run(self):
            trained.append((self.recipe.resolved_run_dir, self.group, self.run_name))
            self.recipe.resolved_run_dir.mkdir(parents=True, exist_ok=True)

    def fake_eval(export, data_dir, siglip_dir=None, tasks=(), **kwargs):
        evaluated.append((Path(export), tasks))
        return {"vqa_acc": 0.5}

    monkeypatch.setattr(trainer, "Trainer", FakeTrainer)
    monkeypatch.setattr(runner, "evaluate_export", fake_eval)
    prep, settings = {"data_dir": "data", "siglip_dir": "siglip"}, {"num_vqa": 4, "overrides": []}
    runs = ablations.seed_recipes("d", [], tmp_path, seeds=2)
    records = [ablations.run_arm(a, r, prep, {}, settings, log=lambda *_: None) for (a, _), r in runs.items()]
    assert [(r["arm"], r["seed"]) for r in records] == [("d", 0), ("d", 1)]
    assert trained == [(tmp_path / "d" / f"seed-{s}", "ablations", f"ablation-d-seed{s}") for s in (0, 1)]
    assert evaluated == [(tmp_path / "d" / f"seed-{s}" / "export", ("und",)) for s in (0, 1)]
    assert json.loads((tmp_path / "d" / "seed-1" / "eval.json").read_text())["seed"] == 1
    again = ablations.run_arm("d", runs[("d", 1)], prep, {}, settings, log=lambda *_: None)
    assert again == records[1] and len(trained) == 2  # cached: no training, no evaluation
    ablations.run_arm("d", runs[("d", 1)], prep, {}, {**settings, "num_vqa": 8}, log=lambda *_: None)
    assert len(evaluated) == 3  # other evaluation settings: evaluated again (the trainer resumes a finished run)
