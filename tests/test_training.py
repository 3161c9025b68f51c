"""Training: freeze policies, REPA on/off, the mixture stream, full runs, exact resume, 2 ranks."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from janusflow.config import MixturePhase, TimeSamplingConfig, load_recipe
from janusflow.data.mixture import MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.data.sources import open_source
from janusflow.models.janusflow import JanusFlow
from janusflow.tokenizer import ByteTokenizer
from janusflow.train.losses import TrainModule
from janusflow.train.stages import NEW_PARTS, apply_freeze_policy
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(rows: list[dict], stage: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if r["stage"] == stage}


def run_tiny(run_dir: Path, overrides=(), stop_after=None, resume="auto"):
    from janusflow.train.trainer import Trainer

    recipe = load_recipe("tiny", [f"run_dir={run_dir}", *overrides])
    return Trainer(recipe, resume=resume, stop_after_steps=stop_after).run()


# ----------------------------------------------------------------------------- EMA


def test_ema_update_in_gathered_groups_equals_one_update(tiny_model, monkeypatch):
    """Under ZeRO-3 the EMA reads the model a group of parameters at a time: the groups cover every tensor once,
    within the budget, and give the same average as one update of all."""
    import janusflow.train.distributed as distributed
    from janusflow.train.optim import EMA

    params = [p for _, p in tiny_model.named_parameters()]
    slices = list(distributed.gathered_groups(params, max_numel=5000))
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(len(params))) and len(slices) > 3
    assert all(s.stop - s.start == 1 or sum(p.numel() for p in params[s]) <= 5000 for s in slices)
    names = [n for n, _ in tiny_model.named_parameters()]
    whole, grouped = EMA(tiny_model, 0.9), EMA(tiny_model, 0.9)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    whole.update(tiny_model, names)
    monkeypatch.setattr(distributed, "GATHER_NUMEL", 5000)
    grouped.update(tiny_model, names)
    for (n, a), b in zip(whole.model.named_parameters(), grouped.model.parameters()):
        assert torch.equal(a, b), n
    assert not torch.equal(whole.model.state_dict()[names[0]], tiny_model.state_dict()[names[0]])


# ----------------------------------------------------------------------------- freeze policies


@pytest.mark.parametrize("policy", ["stage1", "stage2", "stage3"])
def test_freeze_policy_trains_exactly_the_intended_parameters(policy, tiny_model):
    trainable = set(apply_freeze_policy(tiny_model, policy))
    names = {n for n, _ in tiny_model.named_parameters()}
    if policy == "stage1":
        expected = {n for n in names if n.split(".")[0] in NEW_PARTS}
        assert not any(n.startswith(("language_model.", "vision_und_enc_model.")) for n in trainable)
    elif policy == "stage2":
        expected = {n for n in names if not n.startswith("vision_und_enc_model.")}
    else:
        expected = {n for n in names if ".attn_pool." not in n}  # the unused SigLIP pooling head
    assert trainable == expected
    # One real optimizer step on a mixed batch changes exactly the trainable tensors.
    module = TrainModule(tiny_model.train(), repa_weight=1.0, repa_layer=1, repa_hidden=16)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module(_mixed_batch()).get("loss").backward()
    opt.step()
    changed = {n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def _stream(tmp_path: Path, phases, gen_path=None, seed=0, cfg_drop=0.1, **kwargs) -> MixtureStream:
    from janusflow.data.shapes import write_shapes_dataset

    data = write_shapes_dataset(tmp_path / "shapes", num_train=24, num_val=4, image_size=32, max_objects=2, seed=0)
    cfg = load_recipe("tiny")
    tok = ByteTokenizer()
    builder = SampleBuilder(tok, cfg.model, cfg.data, "", 16)
    sources = {"und": [open_source(f"{data}/und_train.json", "llava_json")],
               "gen": [open_source(gen_path or f"{data}/gen_train.jsonl", "caption_jsonl")],
               "text": [open_source(f"{data}/text_train.jsonl", "text_jsonl")]}
    return MixtureStream(sources, builder, MixtureSchedule(phases), seed=seed, cfg_drop_prob=cfg_drop,
                         time_cfg=TimeSamplingConfig(), **kwargs)


def _mixed_batch():
    import tempfile

    stream = _stream(Path(tempfile.mkdtemp()), [MixturePhase(und=1, gen=2, text=1)])
    batch = next(stream.micro_batches(0, 8, 8))
    from janusflow.models.codec import LatentCodec, vae_config

    codec = LatentCodec(AutoencoderKL.from_config(vae_config("tiny")))
    return batch.to_device(torch.device("cpu"), torch.float32, codec)


# ----------------------------------------------------------------------------- REPA


def test_repa_off_computes_no_projector_and_no_siglip_pass(tiny_model):
    batch = _mixed_batch()
    calls = []
    tiny_model.vision_und_enc_model.register_forward_hook(lambda *a: calls.append(1))
    off = TrainModule(tiny_model, repa_weight=0.0, repa_layer=1, repa_hidden=16)
    assert off.projector is None and not any("projector" in n for n, _ in off.named_parameters())
    assert batch.ar.images is not None
    out = off(batch)
    assert "loss_repa" not in out and len(calls) == 1  # only the understanding forward
    calls.clear()
    on = TrainModule(tiny_model, repa_weight=1.0, repa_layer=1, repa_hidden=16)
    out = on(batch)
    assert len(calls) == 2 and -1.0 <= out["loss_repa"].item() <= 1.0
    expected = out["loss_rf"] + out["loss_repa"]
    gen_share = batch.gen.latents.shape[0] / batch.size
    und_share = int(batch.ar.is_und.sum()) / batch.size
    text_share = 1 - gen_share - und_share
    total = gen_share * expected + und_share * out["loss_und"] + text_share * out["loss_text"]
    torch.testing.assert_close(out["loss"], total)


def test_repa_off_stream_prepares_no_repa_targets(tmp_path):
    import dataclasses

    from janusflow.data.latent_cache import build_latent_cache
    from janusflow.models.codec import LatentCodec, vae_config

    phases = [MixturePhase(und=1, gen=2, text=1)]
    _stream(tmp_path, phases)  # writes the dataset
    codec = LatentCodec(AutoencoderKL.from_config(vae_config("tiny")))
    cache = build_latent_cache([open_source(tmp_path / "shapes" / "gen_train.jsonl", "caption_jsonl")], codec, 32,
                               [tmp_path / "latents.pt"])
    on = next(_stream(tmp_path, phases, latent_cache=cache).micro_batches(0, 8, 8))
    off = next(_stream(tmp_path, phases, latent_cache=cache, repa=False).micro_batches(0, 8, 8))
    assert on.gen.crops is not None  # REPA's live target needs the images
    assert off.gen.crops is None and off.gen.repa_targets is None  # the cached latents are all it needs
    for f in dataclasses.fields(on.gen):
        if f.name != "crops":  # everything else is the same batch
            a, b = getattr(on.gen, f.name), getattr(off.gen, f.name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name


# ----------------------------------------------------------------------------- mixture


def test_mixture_ratios_and_schedule():
    sched = MixtureSchedule([MixturePhase(und=30, gen=50, text=20, until_step=10),
                             MixturePhase(und=14, gen=80, text=6)])
    assert sched.ratios(0) == pytest.approx({"gen": 0.5, "und": 0.3, "text": 0.2})
    assert sched.ratios(10) == pytest.approx({"gen": 0.8, "und": 0.14, "text": 0.06})
    rng = random.Random(0)
    totals = {"gen": 0, "und": 0, "text": 0}
    for step in range(10, 2010):
        slots = sched.composition(step, 16, rng)
        assert len(slots) == 16
        for s in slots:
            totals[s] += 1
    n = sum(totals.values())
    assert abs(totals["gen"] / n - 0.8) < 0.01 and abs(totals["und"] / n - 0.14) < 0.01


def test_stream_is_deterministic_and_rank_split_covers_the_global_batch(tmp_path):
    stream = _stream(tmp_path, [MixturePhase(und=1, gen=1, text=1)])
    one = list(stream.micro_batches(3, 8, 2, rank=0, world=1))
    r0 = list(stream.micro_batches(3, 8, 2, rank=0, world=2))
    r1 = list(stream.micro_batches(3, 8, 2, rank=1, world=2))
    assert len(one) == 4 and len(r0) == len(r1) == 2
    for a, b in zip(one, [r0[0], r1[0], r0[1], r1[1]]):
        assert a.counts == b.counts
        for part in ("ar", "gen"):
            if getattr(a, part) is not None:
                for k, v in vars(getattr(a, part)).items():
                    if isinstance(v, torch.Tensor):
                        assert torch.equal(v, getattr(getattr(b, part), k)), k
    with pytest.raises(ValueError, match="divisible"):
        list(stream.micro_batches(0, 6, 4))


def test_cfg_drop_keeps_only_bos_visible(tmp_path):
    stream = _stream(tmp_path, [MixturePhase(und=0, gen=1, text=0)], cfg_drop=0.5)
    tok = ByteTokenizer()
    batch = next(stream.micro_batches(0, 16, 16))
    gen = batch.gen
    visible = gen.prompt_mask.sum(1)
    dropped = visible == 1
    assert 0 < dropped.sum() < 16
    for row in torch.nonzero(dropped).flatten():
        ids = gen.prompt_ids[row][gen.prompt_mask[row].bool()]
        assert ids.tolist() == [tok.bos_id]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (32, 32), "red").save(img_dir / "good.png")
    (img_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    rows = [{"image": "imgs/good.png", "caption": "a red square"},
            {"image": "imgs/broken.png", "caption": "a blue circle"},
            {"image": "imgs/missing.png", "caption": "a green circle"}]
    path = tmp_path / "gen.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    stream = _stream(tmp_path, [MixturePhase(und=0, gen=1, text=0)], gen_path=str(path))
    batch = next(stream.micro_batches(0, 8, 8))
    assert batch.gen.crops.shape[0] == 8 and batch.gen.latents is None
    assert stream.stats["gen_skipped"] > 0 and stream.stats["gen_ok"] == 8
    src = stream.sources["gen"][0]
    assert src.stats["bad_json"] > 0 and src.stats["bad_image"] > 0 and src.stats["missing_file"] > 0
    # the stream counts every skip by its reason (the data/gen_<reason> metrics)
    reasons = {k: stream.stats[f"gen_{k}"] for k in ("bad_json", "bad_image", "missing_file")}
    assert reasons == {k: src.stats[k] for k in reasons} and sum(reasons.values()) == stream.stats["gen_skipped"]


def test_cached_gen_records_are_not_decoded_and_give_the_same_batches(tmp_path, monkeypatch):
    import janusflow.data.sources as sources
    from janusflow.data.latent_cache import build_latent_cache
    from janusflow.models.codec import LatentCodec, vae_config

    data = tmp_path / "shapes"
    _stream(tmp_path, [MixturePhase(gen=1)])  # writes the dataset
    rows = [json.loads(line) for line in (data / "gen_train.jsonl").read_text().splitlines()]
    for i in (3, 5, 7, 11):
        rows[i]["image"] = "images/train/missing.png"
    gen_path = data / "gen_broken.jsonl"
    gen_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    codec = LatentCodec(AutoencoderKL.from_config(vae_config("tiny")))
    cache = build_latent_cache([open_source(gen_path, "caption_jsonl")], codec, 32, [tmp_path / "latents.pt"])
    assert not cache.has(0, 3) and cache.has(0, 2)
    decoded, real_decode = [], sources.decode_image
    monkeypatch.setattr(sources, "decode_image", lambda data, name="": decoded.append(name) or real_decode(data, name))

    def batches(repa: bool):
        stream = _stream(tmp_path, [MixturePhase(und=0, gen=1, text=0)], gen_path=str(gen_path), latent_cache=cache,
                         repa=repa)
        return stream, [next(stream.micro_batches(step, 16, 16)).gen for step in range(3)]

    lean, lean_batches = batches(repa=False)  # the latent cache stands in for every readable image
    assert decoded == []
    full, full_batches = batches(repa=True)  # REPA without its cache needs the pixels: records are read in full
    assert len(decoded) > 0
    for a, b in zip(lean_batches, full_batches):
        assert a.crops is None and b.crops is not None
        for key in ("prompt_ids", "prompt_mask", "latents", "t", "noise_seed"):
            u, v = getattr(a, key), getattr(b, key)
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, key
    assert lean.stats == full.stats and lean.stats["gen_missing_file"] > 0
    assert lean.sources["gen"][0].stats == full.sources["gen"][0].stats  # caption-only reads count as "ok" too


# ----------------------------------------------------------------------------- the pretrained LLM of the prep


def test_prep_llm_learns_the_text_and_stage_1_starts_from_it(tmp_path, cache):
    from transformers import LlamaForCausalLM

    from janusflow.train import prep
    from janusflow.train.trainer import Trainer

    recipe = load_recipe("tiny", [f"run_dir={tmp_path / 'run'}"])
    texts = [[1, 5 + i % 3, 9, 5 + i % 3, 2] for i in range(30)]  # a repeating pattern, learnable
    _, curve = prep.train_llm(texts, recipe.model.llm, pad_id=0, steps=60, batch_size=8, lr=1e-2)
    assert sum(curve[-5:]) / 5 < curve[0] / 3

    recipe = load_recipe("tiny", [f"run_dir={tmp_path / 'run'}", "prep.llm_steps=3", "prep.llm_batch_size=4"])
    trainer = Trainer(recipe, resume="none")
    trainer.setup()
    saved = LlamaForCausalLM.from_pretrained(trainer.prep["llm_path"]).state_dict()
    assert json.loads((Path(trainer.prep["llm_path"]) / "prep.json").read_text())["last_loss"] > 0
    model, _ = trainer.build_model(0, recipe.stages[0])
    start = model.language_model.state_dict()
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    # Without the step, stage 1 starts from the seed's random LLM instead.
    plain = Trainer(load_recipe("tiny", [f"run_dir={tmp_path / 'run2'}"]), resume="none")
    plain.setup()
    assert plain.prep["llm_path"] is None
    other = plain.build_model(0, recipe.stages[0])[0].language_model.state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], saved["model.embed_tokens.weight"])


def test_prep_caches_follow_the_shapes_world_version(tmp_path, monkeypatch):
    """A new DATASET_VERSION (a changed generator) rebuilds the world and everything trained on it."""
    from janusflow.data import shapes
    from janusflow.train import prep

    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("tiny", [f"run_dir={tmp_path / 'run'}", "prep.tokenizer_vocab_size=270",
                                  "prep.codec_steps=2", "prep.codec_batch_size=4", "prep.siglip_steps=2",
                                  "prep.siglip_batch_size=4"])
    keys = ("data_dir", "tokenizer_path", "codec_path", "siglip_dir")
    first = prep.prepare(recipe, log=lambda _: None)
    assert prep.prepare(recipe, log=lambda _: None) == first  # cached: the same folders
    monkeypatch.setattr(shapes, "DATASET_VERSION", shapes.DATASET_VERSION + 1)
    second = prep.prepare(recipe, log=lambda _: None)
    assert all(first[k] and second[k] and Path(first[k]) != Path(second[k]) for k in keys), (first, second)
    assert shapes.read_manifest(second["data_dir"])["params"]["version"] == shapes.DATASET_VERSION


# ----------------------------------------------------------------------------- full runs


def test_tiny_recipe_runs_all_stages_and_exports(tmp_path, cache):
    run = tmp_path / "run"
    run_tiny(run)
    rows = read_metrics(run)
    assert {r["stage"] for r in rows} == {"adaptation", "pretrain", "sft"}
    assert all("loss_rf" in r and "loss_und" in r and r["grad_norm"] > 0 for r in rows)
    export = run / "export"
    for f in ("config.json", "model.safetensors", "processor_config.json", "janusflow_tokenizer.json",
              "vae/config.json"):
        assert (export / f).exists(), f
    model = JanusFlow.from_pretrained(export)
    raw = JanusFlow.from_pretrained(run / "stages" / "3-sft" / "final")
    assert not torch.equal(model.vision_gen_dec_aligner.weight, raw.vision_gen_dec_aligner.weight)  # EMA != raw
    assert len(list((run / "samples").glob("*.png"))) == 3
    assert list((run / "wandb").glob("offline-run-*"))
    # The last grid (the final EMA weights, the export's) shows what tools/sample.py draws at the grid's seed.
    lg = load_recipe("tiny").logging
    cmd = [sys.executable, str(ROOT / "tools" / "sample.py"), "--model", str(export), "--seed", str(lg.sample_seed),
           "--steps", str(lg.sample_steps), "--cfg", str(lg.sample_cfg), "--out", str(tmp_path / "cli")]
    for prompt in lg.sample_prompts:
        cmd += ["--prompt", prompt]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = np.asarray(Image.open(run / "samples" / "3-sft-step000002.png"))
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "cli" / f"grid-seed{lg.sample_seed}.png")))
    # Running again finds every stage complete and does no training.
    run_tiny(run)
    assert len(read_metrics(run)) == len(rows)


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, cache):
    # With an LR decay over the last 3 steps, so the resumed scheduler must pick up where it stopped.
    common = ["stages.0.max_steps=5", "stages.0.decay_steps=3", "train.save_every=100"]
    run_tiny(tmp_path / "a", common, stop_after=5)
    run_tiny(tmp_path / "b", common, stop_after=3)
    assert max(losses(read_metrics(tmp_path / "b"), "adaptation")) == 3
    run_tiny(tmp_path / "b", common, stop_after=2)
    a, b = losses(read_metrics(tmp_path / "a"), "adaptation"), losses(read_metrics(tmp_path / "b"), "adaptation")
    assert sorted(b) == [1, 2, 3, 4, 5]
    assert a == b  # bit-identical loss sequence
    lr = load_recipe("tiny").stages[0].lr
    for run in ("a", "b"):
        logged = [r["lr"] for r in read_metrics(tmp_path / run) if r["stage"] == "adaptation"]
        assert logged == pytest.approx([lr, lr, lr, lr * 2 / 3, lr / 3])  # warm-up 1, constant, decay


def test_grad_clip_bounds_the_update_and_the_norm_is_logged_before_clipping(tmp_path, cache):
    """One fp32 rank, where the trainer clips instead of DeepSpeed: gradients clipped to a norm of 1e-12 lie far
    below Adam's eps, so the weights barely move, while unclipped Adam moves them by about the LR."""
    from janusflow.train.distributed import EnginePolicy
    from janusflow.train.trainer import Trainer

    def first_update(clip: float) -> tuple[float, float]:
        recipe = load_recipe("tiny", [f"run_dir={tmp_path / str(clip)}", "stages.0.max_steps=1",
                                      "stages.1.max_steps=1", "stages.2.max_steps=1", f"train.grad_clip={clip}"])
        policy = EnginePolicy.of(recipe.train, 1, torch.float32)
        assert policy.clips_itself and policy.engine_config(recipe.stages[0], 1, clip, False)["gradient_clipping"] == 0
        trainer = Trainer(recipe)
        trainer.run()
        init, _ = trainer.build_model(0, recipe.stages[0])
        after = JanusFlow.from_pretrained(trainer.stage_dir(0) / "final").state_dict()
        moved = max((after[n] - p).abs().max().item() for n, p in init.state_dict().items())
        norm = next(r["grad_norm"] for r in read_metrics(tmp_path / str(clip)) if r["stage"] == "adaptation")
        return moved, norm

    free_move, free_norm = first_update(0.0)
    clipped_move, clipped_norm = first_update(1e-12)
    assert free_move > 1e-4 and clipped_move < 1e-3 * free_move
    assert clipped_norm == pytest.approx(free_norm, rel=1e-6) and free_norm > 1e-3


def test_two_ranks_zero2_match_one_rank(tmp_path, cache):
    # Everything trainable, and micro-batches whose tasks differ between the ranks (4 gen | 4 und).
    common = ["train.zero_stage=2", "stages.0.max_steps=3", "stages.0.batch_size=8", "stages.0.micro_batch_size=4",
              "stages.0.policy=stage3"]
    run_tiny(tmp_path / "one", common, stop_after=3)
    _torchrun(tmp_path, "two", common, 3)
    one = losses(read_metrics(tmp_path / "one"), "adaptation")
    two = losses(read_metrics(tmp_path / "two"), "adaptation")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- non-finite losses


def _nan_rf_loss(monkeypatch, bad_calls):
    """Make the RF loss NaN on the given real (not placeholder) calls."""
    import janusflow.train.losses as objective

    real, calls = objective.rf_loss, {"n": 0}

    def flaky(v, target):
        out = real(v, target)
        if v.shape[-1] > 4:  # the placeholder latent is 4 x 4; real tiny latents are 16 x 16
            calls["n"] += 1
            if bad_calls is None or calls["n"] in bad_calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(objective, "rf_loss", flaky)


def test_non_finite_loss_skips_the_step(tmp_path, cache, monkeypatch):
    _nan_rf_loss(monkeypatch, {3})
    run_tiny(tmp_path / "r", ["stages.0.max_steps=4"], stop_after=4)
    rows = [r for r in read_metrics(tmp_path / "r") if r["stage"] == "adaptation"]
    assert rows[-1]["skipped_steps"] == 1 and len(rows) == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    tag = (tmp_path / "r" / "stages" / "1-adaptation" / "checkpoints" / "latest").read_text()
    state = torch.load(tmp_path / "r" / "stages" / "1-adaptation" / "checkpoints" / tag / "state.pt",
                       weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["ema"].values())


def test_consecutive_non_finite_losses_stop_with_a_checkpoint(tmp_path, cache, monkeypatch):
    from janusflow.train.trainer import NonFiniteError

    _nan_rf_loss(monkeypatch, None)
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        run_tiny(tmp_path / "r", ["train.max_bad_steps=2", "stages.0.max_steps=5"])
    ckpt = tmp_path / "r" / "stages" / "1-adaptation" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-000002"


def test_non_finite_gradient_stops_the_run(tmp_path, cache, monkeypatch):
    """A finite loss whose gradient is NaN (sqrt'(0) * 0): caught from the gradient norm, on one rank (stage 0)."""
    import janusflow.train.losses as objective
    from janusflow.train.trainer import NonFiniteError

    real = objective.rf_loss
    monkeypatch.setattr(objective, "rf_loss", lambda v, t: real(v, t) + 0.0 * (v - v.detach()).abs().sqrt().sum())
    with pytest.raises(NonFiniteError, match="gradient norm is nan"):
        run_tiny(tmp_path / "r", ["stages.0.max_steps=3"])


def test_unwritable_run_dir_fails_before_training(tmp_path, cache):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="not writable"):
        run_tiny(blocker / "run")


def _torchrun(tmp_path: Path, run: str, overrides, stop_after: int, resume: str = "auto") -> None:
    env = subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           str(ROOT / "tools" / "train.py"), "--recipe", "tiny", "--stop-after-steps", str(stop_after),
           "--resume", resume,
           f"run_dir={tmp_path / run}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_one_fp32_rank_runs_without_zero_unless_it_offloads(tmp_path):
    """ZeRO partitions nothing on one rank: stage 0 then, the recipe's stage with offloading, bf16 or 2 ranks."""
    from janusflow.train.distributed import EnginePolicy

    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    recipe = load_recipe("tiny", ["train.zero_stage=2"])
    plain = EnginePolicy.of(recipe.train, 1, torch.float32)
    assert plain.zero_stage == 0 and plain.engine_config(recipe.stages[0], 1, 1.0, False)["zero_optimization"] == {
        "stage": 0}
    assert EnginePolicy.of(recipe.train, 2, torch.float32).zero_stage == 2
    kept = EnginePolicy.of(load_recipe("tiny", ["train.zero_stage=2", f"train.deepspeed_config={offload}"]).train,
                           1, torch.float32)
    assert kept.zero_stage == 2 and kept.engine_config(recipe.stages[0], 1, 1.0, False)["zero_optimization"][
        "offload_optimizer"] == {"device": "cpu"}
    assert EnginePolicy.of(load_recipe("tiny", ["train.zero_stage=3"]).train, 1, torch.bfloat16).zero_stage == 3


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(tmp_path, cache, first, second):
    """ZeRO shards do not reload on another world size: a clear error, or --resume weights continues."""
    from janusflow.train.trainer import Trainer

    common = ["train.zero_stage=2", "stages.0.max_steps=4", "stages.0.policy=stage3", "train.save_every=100"]
    run_tiny(tmp_path / "ref", common, stop_after=4)
    run = tmp_path / "run"
    if first == 1:
        run_tiny(run, common, stop_after=2)
        _torchrun(tmp_path, "run", common, 2, resume="weights")
    else:
        _torchrun(tmp_path, "run", common, 2)
        recipe = load_recipe("tiny", [f"run_dir={run}", *common])
        with pytest.raises(RuntimeError, match=r"written by 2 ranks \(ZeRO stage 2\) and this run has 1 \(stage 0\)"):
            Trainer(recipe, resume="auto", stop_after_steps=2).run()
        run_tiny(run, common, stop_after=2, resume="weights")
    ref = losses(read_metrics(tmp_path / "ref"), "adaptation")
    got = losses(read_metrics(run), "adaptation")
    assert sorted(got) == [1, 2, 3, 4]
    # Same weights and data at step 3 (its loss is computed before the update); after it the fresh
    # optimizer state makes the runs differ.
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6)
