"""The paper's recipe as the paper ran it: the REPA projector across stages, exact restarts, the LLM's width,
per-stage data and templates, long texts, random crops through the latent cache, fp32 flow numerics in bf16."""

import hashlib
import random
import shutil

import pytest
import torch

from janusflow.config import CodecConfig, ConfigError, MixturePhase, TimeSamplingConfig, load_recipe, model_config
from janusflow.data.mixture import MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.data.sources import CaptionRecord, TextRecord
from janusflow.models.codec import LatentCodec
from janusflow.models.janusflow import JanusFlow
from janusflow.tokenizer import ByteTokenizer
from janusflow.train.losses import TrainModule
from tests.conftest import randomize
from tests.test_speed import _sources
from tests.test_training import run_tiny


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the REPA projector


def test_the_repa_projector_travels_between_stages_and_never_into_the_export(tmp_path, cache, monkeypatch):
    from safetensors.torch import load_file

    from janusflow.train import stage_init

    loaded, real = [], stage_init.load_projector

    def spy(projector, start):
        found = real(projector, start)
        loaded.append((start.parent.name if found else None, {k: v.clone() for k, v in projector.state_dict().items()}))
        return found

    monkeypatch.setattr(stage_init, "load_projector", spy)
    run = tmp_path / "run"
    run_tiny(run)
    assert [name for name, _ in loaded] == [None, "1-adaptation", "2-pretrain"]  # stage 1 starts it fresh
    for (_, state), stage in zip(loaded[1:], ("1-adaptation", "2-pretrain")):
        saved = load_file(str(run / "stages" / stage / "final" / stage_init.PROJECTOR_FILE))
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert not any("projector" in k for k in exported) and not (run / "export" / stage_init.PROJECTOR_FILE).exists()


def test_repa_warmup_trains_the_projector_alone(tmp_path):
    from tests.test_packing import _codec, _stream

    batch = next(_stream(_sources(tmp_path), MixturePhase(und=0, gen=1, text=0)).micro_batches(0, 4, 4))
    with torch.no_grad():
        batch = batch.to_device(torch.device("cpu"), torch.float32, _codec())
    grads = {}
    for name, weight, warmup in (("off", 0.0, False), ("warm", 1.0, True), ("on", 1.0, False)):
        torch.manual_seed(0)
        module = randomize(TrainModule(JanusFlow(model_config("tiny")), weight, 1, 16)).train()
        module.repa_projector_only = warmup
        module(batch)["loss"].backward()
        grads[name] = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    llm = [n for n in grads["off"] if n.startswith("model.language_model.model.layers.0.")]
    assert llm and all(torch.equal(grads["warm"][n], grads["off"][n]) for n in llm)  # no REPA gradient in the LLM
    assert any(not torch.allclose(grads["on"][n], grads["off"][n]) for n in llm)
    assert any(n.startswith("projector.") and grads["warm"][n].abs().sum() > 0 for n in grads["warm"])
    with pytest.raises(ConfigError, match="repa_warmup_steps"):
        load_recipe("tiny", ["stages.0.repa_warmup_steps=9"])
    assert load_recipe("janusflow-1.3b-sft").stages[0].repa_warmup_steps > 0  # the release ships no projector


# ----------------------------------------------------------------------------- exact restart


def test_a_stage_restarted_before_its_first_checkpoint_gives_the_uninterrupted_export(tmp_path, cache):
    """A kill in stage 2 before its first checkpoint (every 7 steps; killed at step 5), then the same command:
    stage 2 starts again from stage 1's weights in a new trainer, and must draw exactly what it drew before."""
    common = ["stages.1.max_steps=10", "train.save_every=7"]
    run_tiny(tmp_path / "a", common)
    run_tiny(tmp_path / "b", common, stop_after=2 + 5)  # stage 1's 2 steps, then 5 of stage 2
    shutil.rmtree(tmp_path / "b" / "stages" / "2-pretrain" / "checkpoints")  # the kill came before any checkpoint
    run_tiny(tmp_path / "b", common)
    exports = [tmp_path / run / "export" / "model.safetensors" for run in ("a", "b")]
    assert _md5(exports[0]) == _md5(exports[1])


# ----------------------------------------------------------------------------- data per stage and templates


def _builder() -> SampleBuilder:
    cfg = load_recipe("tiny")
    return SampleBuilder(ByteTokenizer(), cfg.model, cfg.data, "", 16)


def test_the_papers_templates():
    tok, b = ByteTokenizer(), _builder()
    assert tok.decode(b.prompt_ids("a red circle", "raw")) == "a red circle"  # stages 1-2: "<prompt><image>"
    assert b.prompt_ids("a red circle", "raw")[0] == tok.bos_id
    assert tok.decode(b.prompt_ids("a red circle", "sft")) == "User: a red circle\n\nAssistant:"
    from PIL import Image

    sample = b.und(CaptionRecord(Image.new("RGB", (32, 32), "red"), "a red square"))
    text = tok.decode([i for i in sample.ids if i != tok.image_id], skip_special_tokens=False)
    assert "Generate the caption of this picture. a red square" in text and sample.image is not None
    answer = [t for t, lab in zip(sample.ids, sample.labels) if lab != -100]
    assert tok.decode(answer) == " a red square"  # the caption (and EOS) carry the loss, the instruction does not


def test_stages_read_their_own_sources_with_their_own_templates(tmp_path, cache):
    from janusflow.train.data_setup import RunData

    data = tmp_path / "shapes"
    _sources(tmp_path)  # writes the shapes world
    recipe = load_recipe("tiny", [f"data.gen=[{{path: {data}/gen_train.jsonl, format: caption_jsonl, template: raw}}]",
                                  f"stages.2.data.gen=[{{path: {data}/gen_val.jsonl, format: caption_jsonl}}]",
                                  f"stages.2.data.und=[{{path: {data}/gen_val.jsonl, format: caption_jsonl}}]"])
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    run = RunData(recipe, data, codec, None)
    tok = ByteTokenizer()
    first = next(run.stream(0, tok, None, repa=False).micro_batches(0, 8, 8))
    last = next(run.stream(2, tok, None, repa=False).micro_batches(0, 8, 8))
    assert run.source_cfgs(2)["text"] == run.source_cfgs(0)["text"]  # a task the stage leaves out keeps the recipe's
    assert str(run.source_cfgs(2)["gen"][0].path).endswith("gen_val.jsonl")
    kept = first.gen.prompt_mask.sum(1) > 1  # rows whose prompt was not dropped for CFG
    assert kept.any() and not any("User:" in tok.decode(r.tolist()) for r in first.gen.prompt_ids[kept])
    rows = last.gen.prompt_ids[last.gen.prompt_mask.sum(1) > 1]
    assert all("User:" in tok.decode(r.tolist()) for r in rows)  # stage 3's own source, the SFT template
    assert any("Generate the caption" in tok.decode(r.tolist()) for r in last.ar.input_ids)  # caption data as und


def test_the_13b_recipes_follow_the_paper():
    r = load_recipe("janusflow-1.3b")
    assert r.model.llm.intermediate_size == 5632 and r.data.pack_length == 4096
    assert [s.batch_unit for s in r.stages] == ["sequences"] * 3
    assert all(src.template == "raw" for src in r.data.gen)  # stages 1-2: "<prompt><image>"
    sft = r.stages[2]
    assert sft.data is not None and all(src.template == "sft" for src in sft.data.gen)
    assert sft.data.und and sft.data.text and sft.data.und != r.data.und  # instruction data, not pre-training data
    assert any(src.template == "caption" for src in r.data.und)
    with pytest.raises(ConfigError, match="batch_unit"):
        load_recipe("tiny", ["stages.0.batch_unit=sequences"])


# ----------------------------------------------------------------------------- long text, crops


def test_long_text_is_chunked_not_cut():
    b, tok = _builder(), ByteTokenizer()
    context = load_recipe("tiny").data.max_seq_len
    text = "".join(chr(97 + i % 26) for i in range(3 * context))
    chunks = b.text(TextRecord(text), random.Random(0), all_chunks=True)
    assert len(chunks) == 4 and all(len(c.ids) <= context for c in chunks)
    assert "".join(tok.decode(c.ids) for c in chunks) == text and b.stats["text_chunked"] == 1
    one = b.text(TextRecord(text), random.Random(1))
    assert len(one) == 1 and tok.decode(one[0].ids) in text


def test_random_crops_survive_the_latent_cache(tmp_path):
    from PIL import Image

    from janusflow.data.latent_cache import build_latent_cache, cached_crop
    from janusflow.data.sources import CaptionJsonlSource

    folder = tmp_path / "wide"
    folder.mkdir()
    rows = []
    for i in range(3):
        Image.effect_noise((96, 32), 80 + i).convert("RGB").save(folder / f"{i}.png")
        rows.append(f'{{"image": "{i}.png", "caption": "noise {i}"}}')
    (folder / "gen.jsonl").write_text("\n".join(rows) + "\n")
    src = CaptionJsonlSource(folder / "gen.jsonl")
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    cache_ = build_latent_cache([src], codec, 32, [tmp_path / "latents.pt"], crops=4)
    assert cache_.crops == 4 and cache_.shards[0][0]["latents"].shape[:2] == (3, 4)
    crops = [cached_crop(src[1].image, 1, k, 32) for k in range(4)]
    assert len({c.float().sum().item() for c in crops}) == 4  # four different crops of a wide image
    with torch.no_grad():
        direct = codec.encode(torch.stack([c.float() / 127.5 - 1 for c in crops]))
    torch.testing.assert_close(torch.stack([cache_.get(0, 1, k) for k in range(4)]), direct, rtol=1e-5, atol=1e-5)
    stream = MixtureStream({"gen": [src]}, _builder(), MixtureSchedule([MixturePhase(und=0, gen=1, text=0)]), seed=0,
                           cfg_drop_prob=0.0, time_cfg=TimeSamplingConfig(), latent_cache=cache_, repa=False)
    seen = {round(s.latent.sum().item(), 4) for step in range(20) for s in stream.global_batch(step, 4)}
    assert len(seen) > 6  # uses draw different crops of the three images


# ----------------------------------------------------------------------------- bf16 numerics


def test_bf16_keeps_the_flow_in_fp32(tmp_path, monkeypatch):
    import janusflow.train.losses as objective
    from tests.test_packing import _codec, _stream

    seen = {}
    real_noisy, real_rf = objective.noisy_latents, objective.rf_loss

    def noisy(x1, t, seed):
        z_t, target = real_noisy(x1, t, seed)
        seen.update(x1=x1.dtype, t=t.dtype, z_t=z_t.dtype, target=target.dtype)
        return z_t, target

    monkeypatch.setattr(objective, "noisy_latents", noisy)
    monkeypatch.setattr(objective, "rf_loss", lambda v, target: seen.update(v=v.dtype, rf_target=target.dtype)
                        or real_rf(v, target))
    batch = next(_stream(_sources(tmp_path), MixturePhase(und=1, gen=1, text=0)).micro_batches(0, 4, 4))
    with torch.no_grad():
        batch = batch.to_device(torch.device("cpu"), torch.bfloat16, _codec())
    assert batch.ar.images.dtype == torch.bfloat16  # the model's inputs take the model's dtype
    torch.manual_seed(0)
    module = TrainModule(JanusFlow(model_config("tiny")).to(torch.bfloat16), 1.0, 1, 16).to(torch.bfloat16)
    out = module(batch)
    assert torch.isfinite(out["loss"])
    assert seen["x1"] == seen["t"] == seen["z_t"] == seen["target"] == seen["rf_target"] == torch.float32
    assert seen["v"] == torch.bfloat16  # the model's output; the MSE is taken in fp32


# ----------------------------------------------------------------------------- caches at scale


def test_latent_cache_shards_are_built_by_every_rank_and_resume(tmp_path, monkeypatch):
    """Each rank writes its share of the shards; a build that finds shards written writes only the others; the
    shards read back as one cache, the same as one process builds."""
    from janusflow.data import latent_cache as lc
    from janusflow.data.shapes import write_shapes_dataset
    from janusflow.data.sources import CaptionJsonlSource

    monkeypatch.setattr(lc, "SHARD_RECORDS", 8)
    data = write_shapes_dataset(tmp_path / "shapes", num_train=30, num_val=2, image_size=32, max_objects=2, seed=0)
    src = CaptionJsonlSource(data / "gen_train.jsonl")
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    writer = lc.latent_writer(codec, 32)
    one = lc.build_latent_cache([src], codec, 32, [tmp_path / "one"])
    real, encoded = lc._encode_shard, []
    monkeypatch.setattr(lc, "_encode_shard", lambda *a: encoded.append(a[6].name) or real(*a))
    lc.RecordCache.write("latents", [src], *writer, [tmp_path / "two"], rank=1, world=2)
    assert encoded == ["shard-00001.pt", "shard-00003.pt"]
    lc.RecordCache.write("latents", [src], *writer, [tmp_path / "two"], rank=1, world=2)  # again: nothing to do
    lc.RecordCache.write("latents", [src], *writer, [tmp_path / "two"], rank=0, world=2)
    assert encoded == ["shard-00001.pt", "shard-00003.pt", "shard-00000.pt", "shard-00002.pt"]
    two = lc.RecordCache.load("latents", [tmp_path / "two"])
    assert len(two.shards[0]) == 4 and torch.equal(two.valid[0], one.valid[0])
    assert all(torch.equal(two.get(0, i), one.get(0, i)) for i in range(30))


def test_a_repa_cache_over_its_budget_is_left_off(tmp_path, monkeypatch, capsys, cache):
    from janusflow.train.data_setup import RunData

    _sources(tmp_path)  # writes the shapes world
    recipe = load_recipe("tiny", [f"data.gen=[{{path: {tmp_path}/shapes/gen_train.jsonl, format: caption_jsonl}}]",
                                  "data.repa_cache_max_gb=1e-6"])
    run = RunData(recipe, tmp_path / "shapes", LatentCodec.from_config(CodecConfig(preset="tiny")), None)
    model = JanusFlow(model_config("tiny")).requires_grad_(False)
    assert run.repa_targets(0, model, torch.device("cpu")) is None
    assert "REPA targets are computed live: their cache would take" in capsys.readouterr().out
    recipe.data.repa_cache_max_gb = 1.0
    assert run.repa_targets(0, model, torch.device("cpu")) is not None
