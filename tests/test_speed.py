"""Speed options: cached REPA targets, activation checkpointing, torch.compile, SDPA, data workers, packing.

Each option must leave the numbers unchanged: the tests compare against the plain path.
"""

from pathlib import Path

import pytest
import torch

from janusflow.config import CodecConfig, MixturePhase, TimeSamplingConfig, load_recipe
from janusflow.data.batch import Batch
from janusflow.data.latent_cache import build_latent_cache, build_repa_cache, weights_digest
from janusflow.data.mixture import MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.data.sources import open_source
from janusflow.data.transforms import siglip_view
from janusflow.models.codec import LatentCodec
from janusflow.tokenizer import ByteTokenizer
from janusflow.train.losses import TrainModule
from tests.test_training import losses, read_metrics, run_tiny


def _sources(tmp_path: Path) -> dict:
    from janusflow.data.shapes import write_shapes_dataset

    data = write_shapes_dataset(tmp_path / "shapes", num_train=24, num_val=4, image_size=32, max_objects=2, seed=0)
    return {"und": [open_source(f"{data}/und_train.json", "llava_json")],
            "gen": [open_source(f"{data}/gen_train.jsonl", "caption_jsonl")],
            "text": [open_source(f"{data}/text_train.jsonl", "text_jsonl")]}


def _stream(sources: dict, phase: MixturePhase, **kwargs) -> MixtureStream:
    cfg = load_recipe("tiny")
    builder = SampleBuilder(ByteTokenizer(), cfg.model, cfg.data, "", 16)
    return MixtureStream(sources, builder, MixtureSchedule([phase]), seed=0, cfg_drop_prob=0.1,
                         time_cfg=TimeSamplingConfig(), **kwargs)


# ----------------------------------------------------------------------------- REPA target cache


def test_cached_repa_targets_equal_the_live_siglip_features(tmp_path, tiny_model):
    sources = _sources(tmp_path)
    torch.manual_seed(0)
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    size, und = tiny_model.config.gen_image_size, tiny_model.config.und_encoder
    latents = build_latent_cache(sources["gen"], codec, size, [tmp_path / "latents.pt"])
    feats = build_repa_cache(sources["gen"], tiny_model.vision_und_enc_model, und, size, [tmp_path / "repa.pt"])
    disk = sum(f.stat().st_size for f in (tmp_path / "repa.pt").iterdir())
    assert feats.shards[0][0]["features"].dtype == torch.float16 and disk < 2 * 24 * 16 * 32 * 2
    phase = MixturePhase(und=0, gen=1, text=0)
    live = next(_stream(sources, phase, latent_cache=latents).micro_batches(3, 8, 8)).gen
    cached = next(_stream(sources, phase, latent_cache=latents, repa_cache=feats).micro_batches(3, 8, 8)).gen
    assert live.repa_targets is None and live.crops is not None and cached.crops is None
    with torch.no_grad():
        target = tiny_model.vision_und_enc_model(siglip_view(live.crops, und))
    assert (target[0] - target[1]).abs().max() > 1e-2  # features that depend on the image
    torch.testing.assert_close(cached.repa_targets, target, rtol=1e-3, atol=1e-5)  # fp16 storage
    # The REPA loss barely moves; everything else is bit-identical.
    module = TrainModule(tiny_model.train(), repa_weight=1.0, repa_layer=1, repa_hidden=16)
    outs = [module(Batch(size=8, gen=gen)) for gen in (live, cached)]
    assert outs[0]["loss_rf"] == outs[1]["loss_rf"]
    assert abs(outs[0]["loss_repa"] - outs[1]["loss_repa"]) < 1e-4
    # Another encoder (any weight changed) gets another cache key.
    digest = weights_digest(tiny_model.vision_und_enc_model)
    with torch.no_grad():
        tiny_model.vision_und_enc_model.vision_tower.norm.weight[0] += 1e-3
    assert weights_digest(tiny_model.vision_und_enc_model) != digest


def test_trainer_caches_repa_targets_only_while_siglip_is_frozen(tmp_path, cache, monkeypatch):
    from janusflow.train.data_setup import RunData

    used = []
    real = RunData.repa_targets
    monkeypatch.setattr(RunData, "repa_targets", lambda *args: used.append(real(*args)) or used[-1])
    run_tiny(tmp_path / "cached")
    assert [c is not None for c in used] == [True, True, False]  # stage 3 trains SigLIP: live targets
    assert len(list(cache.glob("repa-*"))) == 1  # stages 1 and 2 share the frozen tower's cache
    run_tiny(tmp_path / "live", ["data.cache_repa_features=false"])
    a, b = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "live")
    for stage in ("adaptation", "pretrain", "sft"):
        la, lb = losses(a, stage), losses(b, stage)
        assert la.keys() == lb.keys()
        for step in la:
            assert la[step] == pytest.approx(lb[step], rel=1e-3, abs=1e-4), (stage, step)


# ----------------------------------------------------------------------------- checkpointing, compile


def _mixed_batch(tmp_path: Path) -> Batch:
    """und + text + gen rows, latents from an untrained tiny codec, REPA targets live (pixels)."""
    batch = next(_stream(_sources(tmp_path), MixturePhase(und=1, gen=2, text=1)).micro_batches(0, 8, 8))
    torch.manual_seed(0)
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    with torch.no_grad():
        return batch.to_device(torch.device("cpu"), torch.float32, codec)


def _tiny_module(policy: str = "stage3", **speed) -> TrainModule:
    from janusflow.config import model_config
    from janusflow.models.janusflow import JanusFlow
    from janusflow.train.optim import apply_speed_options
    from janusflow.train.stages import apply_freeze_policy
    from tests.conftest import randomize

    model = JanusFlow(model_config("tiny"))
    module = randomize(TrainModule(model, repa_weight=1.0, repa_layer=1, repa_hidden=16)).train()
    apply_freeze_policy(model, policy)
    apply_speed_options(model, speed.get("activation_checkpointing", False), speed.get("compile", False))
    return module


def _grads(module: TrainModule) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients(tmp_path):
    batch = _mixed_batch(tmp_path)
    runs = []
    for ckpt in (False, True):
        module = _tiny_module(activation_checkpointing=ckpt)
        calls = {"llm": 0, "siglip": 0}
        for key, layer in (("llm", module.model.language_model.model.layers[0].mlp),
                           ("siglip", module.model.vision_und_enc_model.vision_tower.blocks[0])):
            # A pre-hook: the recompute stops (early) as soon as it has what the backward needs.
            layer.register_forward_pre_hook(lambda *_, key=key, calls=calls: calls.__setitem__(key, calls[key] + 1))
        out = module(batch)
        out["loss"].backward()
        runs.append((out, _grads(module), calls))
    (plain, g0, c0), (ckpt, g1, c1) = runs
    # Recomputed in the backward pass: each LLM forward (und/text + gen) runs twice; SigLIP's grad-enabled
    # forward (understanding images) twice, its no-grad REPA forward once.
    assert c1["llm"] == 2 * c0["llm"] == 4 and c1["siglip"] == c0["siglip"] + 1 == 3
    for k in ("loss", "loss_rf", "loss_repa", "loss_und", "loss_text"):
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=0)
    assert g0.keys() == g1.keys() and any(k.startswith("projector.") for k in g0)
    assert any(k.startswith("model.vision_und_enc_model.") for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo graph capture + AOTAutograd, no C++ build: seconds
    pytest.param("inductor", marks=pytest.mark.skipif(
        not __import__("os").environ.get("JANUSFLOW_SLOW_TESTS"),
        reason="inductor builds C++ kernels for ~1.5 min on a 2-core CPU (the shipped default; set "
               "JANUSFLOW_SLOW_TESTS=1 to run it)")),
])
def test_compiled_gen_encoder_decoder_give_the_eager_losses(tmp_path, monkeypatch, backend):
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    mixed = _mixed_batch(tmp_path)
    ar_only = Batch(size=mixed.size, ar=mixed.ar)  # no gen rows: the generation path runs on its placeholder
    results = []
    for compiled in (False, True):
        module = _tiny_module(compile=compiled)
        assert (module.model.vision_gen_dec_model._compiled_call_impl is not None) == compiled
        outs = [module(b) for b in (mixed, ar_only)]  # real gen rows, then the one-row placeholder
        (outs[0]["loss"] + outs[1]["loss"]).backward()
        results.append((outs, _grads(module)))
    (eager, g0), (comp, g1) = results
    for a, b in zip(eager, comp):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_trainer_runs_with_checkpointing_and_compile(tmp_path, cache, monkeypatch):
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    common = ["stages.0.max_steps=2", "stages.0.policy=stage3"]
    run_tiny(tmp_path / "plain", common, stop_after=2)
    run_tiny(tmp_path / "fast", [*common, "train.activation_checkpointing=true", "train.compile=true"], stop_after=2)
    plain, fast = losses(read_metrics(tmp_path / "plain"), "adaptation"), losses(read_metrics(tmp_path / "fast"),
                                                                                 "adaptation")
    assert sorted(plain) == sorted(fast) == [1, 2]
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=1e-5)


# ----------------------------------------------------------------------------- attention kernels


def test_llm_uses_sdpa_by_default_and_flash_attention_is_selectable(tiny_model, tmp_path):
    import importlib.util

    from janusflow.config import model_config
    from janusflow.models.janusflow import JanusFlow
    from tests.conftest import randomize

    assert tiny_model.language_model.config._attn_implementation == "sdpa"
    tiny_model.save_pretrained(tmp_path / "m")
    assert JanusFlow.from_pretrained(tmp_path / "m").language_model.config._attn_implementation == "sdpa"
    eager = randomize(JanusFlow(model_config("tiny", llm={"attn_implementation": "eager"}))).eval()
    assert eager.language_model.config._attn_implementation == "eager"
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generation prompts have
    with torch.no_grad():
        a = tiny_model.forward_und(ids, mask).logits
        b = eager.forward_und(ids, mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2"):  # passed through to transformers
            JanusFlow(model_config("tiny", llm={"attn_implementation": "flash_attention_2"}))


# ----------------------------------------------------------------------------- data workers


def _assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    import dataclasses

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.size == y.size and x.counts == y.counts
        for part in ("ar", "gen"):
            dx, dy = getattr(x, part), getattr(y, part)
            assert (dx is None) == (dy is None)
            for f in dataclasses.fields(dx) if dx is not None else ():
                u, v = getattr(dx, f.name), getattr(dy, f.name)
                assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, (part, f.name)


def test_data_workers_give_the_same_batches_and_counters(tmp_path):
    sources = _sources(tmp_path)
    phase = MixturePhase(und=1, gen=2, text=1)
    ref_stream = _stream(sources, phase)
    ref = list(ref_stream.batches(0, 6, 8, 4))
    assert len(ref) == 6 and all(len(m) == 2 for m in ref)
    stream = _stream(sources, phase)
    got = list(stream.batches(0, 6, 8, 4, num_workers=2))
    for a, b in zip(ref, got):
        _assert_same_batches(a, b)
    assert stream.stats == ref_stream.stats and stream.builder.stats == ref_stream.builder.stats
    # Resuming at step 4 (a fresh stream, as after a restart) with workers gives steps 4 and 5 again,
    # and rank 1 of 2 its half of them.
    for a, b in zip(ref[4:], _stream(sources, phase).batches(4, 6, 8, 4, num_workers=2)):
        _assert_same_batches(a, b)
    for a, b in zip(ref[4:], _stream(sources, phase).batches(4, 6, 8, 4, rank=1, world=2, num_workers=2)):
        _assert_same_batches(a[1:], b)


def test_trainer_with_data_workers_resumes_exactly(tmp_path, cache):
    common = ["stages.0.max_steps=4", "train.save_every=100"]
    run_tiny(tmp_path / "ref", common, stop_after=4)
    run_tiny(tmp_path / "w", [*common, "data.num_workers=2"], stop_after=2)
    run_tiny(tmp_path / "w", [*common, "data.num_workers=2"], stop_after=2)
    ref, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "w")
    assert losses(ref, "adaptation") == losses(got, "adaptation")  # bit-identical
    counters = [{k: v for k, v in r.items() if k.startswith("data/")} for r in (ref[-1], got[-1])]
    assert counters[0] == counters[1] and counters[0]["data/gen_ok"] > 0


# ----------------------------------------------------------------------------- sequence packing


def test_trainer_with_packing_matches_unpacked(tmp_path, cache):
    """data.pack_length with the batch counted in samples: the same samples, packed; the same losses."""
    common = ["stages.0.max_steps=3", "stages.0.policy=stage3", "stages.0.mixture.0.text=50"]
    run_tiny(tmp_path / "plain", common, stop_after=3)
    run_tiny(tmp_path / "packed", [*common, "data.pack_length=512"], stop_after=3)
    a, b = (losses(read_metrics(tmp_path / d), "adaptation") for d in ("plain", "packed"))
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4)
