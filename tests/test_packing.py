"""Packing like the paper (data.pack_length): samples of all three tasks share fixed-length rows, each attending
only to itself with its own positions; the losses and gradients are the unpacked per-sample ones."""

import pytest
import torch

from janusflow.config import CodecConfig, MixturePhase, TimeSamplingConfig, load_recipe
from janusflow.data.batch import ArSample, GenSample, collate_packed, sample_length
from janusflow.data.mixture import MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.models.codec import LatentCodec
from janusflow.models.packing import block_causal_mask, segment_boundaries
from janusflow.tokenizer import ByteTokenizer
from janusflow.train.losses import TrainModule
from janusflow.train.stages import apply_freeze_policy
from tests.test_speed import _sources
from tests.test_training import losses, read_metrics, run_tiny

GEN_TOKENS = 64  # the tiny model: 32 px -> 16 x 16 latents -> 8 x 8 tokens


def _stream(sources, phase, **kwargs) -> MixtureStream:
    cfg = load_recipe("tiny")
    builder = SampleBuilder(ByteTokenizer(), cfg.model, cfg.data, "", 16)
    return MixtureStream(sources, builder, MixtureSchedule([phase]), seed=0, cfg_drop_prob=0.3,
                         time_cfg=TimeSamplingConfig(), gen_tokens=GEN_TOKENS, **kwargs)


def _codec() -> LatentCodec:
    torch.manual_seed(0)
    return LatentCodec.from_config(CodecConfig(preset="tiny"))


def _module() -> TrainModule:
    from janusflow.config import model_config
    from janusflow.models.janusflow import JanusFlow
    from tests.conftest import randomize

    module = randomize(TrainModule(JanusFlow(model_config("tiny")), repa_weight=1.0, repa_layer=1, repa_hidden=16))
    return module.train()


def test_block_causal_mask_and_boundaries():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    mask = block_causal_mask(segments)[:, 0]
    assert mask[0, 1, 0] and not mask[0, 0, 1] and not mask[0, 2, 1] and mask[0, 4, 2]  # causal, within a sample
    assert mask[0, 5].tolist() == [False] * 5 + [True]  # padding sees only itself
    assert segment_boundaries(segments).tolist() == [0, 2, 5, 6, 10, 11, 12]


def test_collate_packed_places_every_sample_with_its_own_positions():
    tok = ByteTokenizer()
    und = ArSample("und", [tok.bos_id, 65, 66, 67], [-100, -100, 66, 67])
    gen = GenSample([tok.bos_id, 70, 71], drop_prompt=False, latent=torch.zeros(4, 4, 4))
    dropped = GenSample([tok.bos_id, 72, 73, 74], drop_prompt=True, latent=torch.zeros(4, 4, 4))
    samples = [und, gen, dropped]
    lengths = [sample_length(s, 2) for s in samples]
    assert lengths == [4, 3 + 1 + 2, 1 + 1 + 2]
    ar, rows, layout = collate_packed(samples, [[0, 1], [2]], 10, tok, 2, torch.tensor([0.3, 0.6]), 7)
    assert ar.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert ar.position_ids[1, :4].tolist() == [0, 4, 5, 6]  # a dropped prompt keeps its length as a gap
    assert ar.input_ids[1, 0] == tok.bos_id and layout.segments[1].tolist() == [2] * 4 + [-1] * 6
    assert layout.gen_slots.tolist() == [[7, 8, 9], [11, 12, 13]]  # time token + 2 image tokens, flat positions
    assert ar.labels[0, 4:].eq(-100).all() and ar.labels[0, :4].tolist() == [-100, -100, 66, 67]
    assert rows.t.tolist() == pytest.approx([0.3, 0.6]) and rows.prompt_ids is None and rows.noise_seed == 7


@pytest.mark.parametrize("pack_length", [160, 512])
def test_packed_losses_and_gradients_equal_the_unpacked_ones(tmp_path, pack_length):
    sources, codec = _sources(tmp_path), _codec()
    phase = MixturePhase(und=1, gen=2, text=1)
    plain = next(_stream(sources, phase).micro_batches(0, 8, 8))
    packed = next(_stream(sources, phase, pack_length=pack_length).micro_batches(0, 8, 8))
    assert packed.ar.input_ids.shape[0] < 8 and packed.ar.input_ids.shape[1] == pack_length
    assert plain.gen.prompt_mask.sum(1).eq(1).any()  # a CFG-dropped prompt is among them
    runs = []
    for batch in (plain, packed):
        module = _module()
        with torch.no_grad():
            batch = batch.to_device(torch.device("cpu"), torch.float32, codec)
        out = module(batch)
        out["loss"].backward()
        runs.append((out, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = runs
    assert a.keys() == b.keys() == {"loss", "loss_und", "loss_text", "loss_rf", "loss_repa"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sequence_batches_fill_rows_of_the_pack_length(tmp_path):
    stream = _stream(_sources(tmp_path), MixturePhase(und=1, gen=2, text=1), pack_length=512,
                     batch_unit="sequences")
    micros = list(stream.micro_batches(3, 4, 2))
    assert len(micros) == 2 and all(m.ar.input_ids.shape == (2, 512) for m in micros)
    filled = sum(int((m.layout.segments >= 0).sum()) for m in micros)
    assert filled > 0.8 * 4 * 512  # rows are filled, not one sample each
    again = list(_stream(_sources(tmp_path / "b"), MixturePhase(und=1, gen=2, text=1), pack_length=512,
                         batch_unit="sequences").micro_batches(3, 4, 2, rank=1, world=2))
    assert torch.equal(again[0].ar.input_ids, micros[1].ar.input_ids)  # rank 1 of 2 gets block 1


def test_trainer_packs_every_task_and_two_ranks_match_one(tmp_path, monkeypatch):
    from tests.test_training import _torchrun

    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "_cache"))
    common = ["data.pack_length=512", "stages.0.batch_unit=sequences", "stages.0.max_steps=3",
              "stages.0.batch_size=4", "stages.0.micro_batch_size=2", "stages.0.policy=stage3", "train.zero_stage=2",
              "stages.0.mixture.0.text=30"]
    run_tiny(tmp_path / "one", common, stop_after=3)
    _torchrun(tmp_path, "two", common, 3)
    one, two = losses(read_metrics(tmp_path / "one"), "adaptation"), losses(read_metrics(tmp_path / "two"),
                                                                           "adaptation")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    rows = [r for r in read_metrics(tmp_path / "one") if r["stage"] == "adaptation"]
    assert all(k in rows[-1] for k in ("loss_rf", "loss_und", "loss_text"))


def _call_order(module: TrainModule, batch) -> tuple[list[str], list[str]]:
    """The names of the modules in the order their forward starts, and in the order their backward starts."""
    forward, backward, handles = [], [], []
    for name, sub in module.named_modules():
        handles.append(sub.register_forward_pre_hook(lambda m, i, name=name: forward.append(name)))
        handles.append(sub.register_full_backward_pre_hook(lambda m, g, name=name: backward.append(name)))
    module(batch)["loss"].backward()
    for h in handles:
        h.remove()
    return forward, backward


@pytest.mark.filterwarnings("ignore:For backward hooks to be called")
@pytest.mark.parametrize("pack_length", [None, 160])
@pytest.mark.parametrize("policy", ["stage1", "stage3"])
def test_every_task_mix_calls_the_modules_in_one_order(tmp_path, pack_length, policy):
    """ZeRO-3 gathers each module's parameters collectively when its forward or backward starts, so a rank whose
    micro-batch holds only understanding, only generation or only text must call them in the same order."""
    sources, codec, orders = _sources(tmp_path), _codec(), {}
    for name, phase in {"mixed": MixturePhase(und=1, gen=2, text=1), "und": MixturePhase(und=1, gen=0, text=0),
                        "gen": MixturePhase(und=0, gen=1, text=0), "text": MixturePhase(und=0, gen=0, text=1)}.items():
        batch = next(_stream(sources, phase, pack_length=pack_length).micro_batches(0, 4, 4))
        with torch.no_grad():
            batch = batch.to_device(torch.device("cpu"), torch.float32, codec)
        module = _module()
        apply_freeze_policy(module.model, policy)
        orders[name] = _call_order(module, batch)
    forward, backward = orders["mixed"]
    assert "model.vision_und_enc_aligner" in backward and "model.vision_gen_enc_model" in backward
    for name, (f, b) in orders.items():
        assert f == forward, name
        assert b == backward, name
