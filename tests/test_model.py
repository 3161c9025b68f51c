"""The model: official key set and shapes, official maths of the blocks, checkpoint I/O."""

import json

import pytest
import torch
import torch.nn.functional as F

from janusflow.config import model_config
from janusflow.models.gen_encdec import ConvNextBlock, GlobalResponseNorm
from janusflow.models.janusflow import JanusFlow
from janusflow.tokenizer import ByteTokenizer, expand_image_tokens, image_seq_mask, und_prompt

from .conftest import randomize

# janusflow_facts.md §1 / §6: official shapes of the JanusFlow-1.3B checkpoint.
OFFICIAL_SHAPES = {
    "beg_of_und_embed": (1, 2048),
    "vision_und_enc_model.vision_tower.pos_embed": (1, 576, 1024),
    "vision_und_enc_model.vision_tower.patch_embed.proj.weight": (1024, 3, 16, 16),
    "vision_und_enc_model.vision_tower.blocks.23.mlp.fc2.weight": (1024, 4096),
    "vision_und_enc_model.vision_tower.norm.weight": (1024,),
    "vision_und_enc_aligner.weight": (2048, 1024),
    "vision_gen_enc_model.time_embed.linear_1.weight": (2048, 768),
    "vision_gen_enc_model.time_embed.linear_2.weight": (2048, 2048),
    "vision_gen_enc_model.in_conv.weight": (768, 4, 2, 2),
    "vision_gen_enc_model.mid_block.res_blocks.1.depthwise.weight": (768, 1, 7, 7),
    "vision_gen_enc_model.mid_block.res_blocks.1.channelwise_norm.weight": (1, 1, 1, 3072),
    "vision_gen_enc_model.mid_block.res_blocks.1.cond_embeds_mapper.weight": (1536, 2048),
    "vision_gen_enc_aligner.weight": (2048, 768),
    "vision_gen_dec_model.mid_block.res_blocks.0.depthwise.weight": (1536, 1, 7, 7),
    "vision_gen_dec_model.mid_block.res_blocks.0.channelwise_linear_1.weight": (6144, 1536),
    "vision_gen_dec_model.mid_block.res_blocks.0.cond_embeds_mapper.weight": (3072, 2048),
    "vision_gen_dec_model.out_convs.0.norm.weight": (1536,),
    "vision_gen_dec_model.out_convs.0.unpatch_conv.weight": (16, 1536, 1, 1),
    "vision_gen_dec_model.input_norm.weight": (768,),
    "language_model.model.embed_tokens.weight": (102400, 2048),
    "language_model.model.layers.23.self_attn.q_proj.weight": (2048, 2048),
    "language_model.model.layers.0.mlp.gate_proj.weight": (5632, 2048),  # DeepSeek-LLM-1.3B's width (facts §1.1)
    "language_model.model.layers.0.mlp.down_proj.weight": (2048, 5632),
    "language_model.model.norm.weight": (2048,),
    "language_model.lm_head.weight": (102400, 2048),
    "vision_gen_dec_aligner_norm.weight": (2048,),
    "vision_gen_dec_aligner.weight": (768, 2048),
    "vision_gen_dec_aligner.bias": (768,),
}
TOP_LEVEL = {
    "vision_und_enc_model", "vision_und_enc_aligner", "beg_of_und_embed", "vision_gen_enc_model",
    "vision_gen_enc_aligner", "vision_gen_dec_model", "language_model", "vision_gen_dec_aligner_norm",
    "vision_gen_dec_aligner",
}
CONVNEXT_KEYS = {"depthwise.weight", "depthwise.bias", "norm.weight", "channelwise_linear_1.weight",
                 "channelwise_linear_1.bias", "channelwise_norm.weight", "channelwise_norm.bias",
                 "channelwise_linear_2.weight", "channelwise_linear_2.bias", "cond_embeds_mapper.weight",
                 "cond_embeds_mapper.bias"}


def test_official_key_set_on_meta_device():
    with torch.device("meta"):
        model = JanusFlow(model_config("janusflow-1.3b"))
    sd = model.state_dict()
    assert {k.split(".")[0] for k in sd} == TOP_LEVEL
    for key, shape in OFFICIAL_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    for side in ("vision_gen_enc_model", "vision_gen_dec_model"):
        for i in (0, 1):
            prefix = f"{side}.mid_block.res_blocks.{i}."
            assert {k[len(prefix):] for k in sd if k.startswith(prefix)} == CONVNEXT_KEYS
        assert not any(k.startswith(f"{side}.mid_block.res_blocks.2") for k in sd)
    assert sum(k.startswith("vision_gen_dec_model.out_convs.") for k in sd) == 3
    gen_params = sum(v.numel() for k, v in sd.items() if k.startswith("vision_gen_"))
    assert 60e6 < gen_params < 80e6  # the paper: g_enc + g_dec ~ 70M parameters
    n_layers = {k.split(".")[3] for k in sd if k.startswith("language_model.model.layers.")}
    assert len(n_layers) == 24


def test_convnext_block_matches_official_formula():
    torch.manual_seed(0)
    block = randomize(ConvNextBlock(8, 1e-6, True, 12))
    x, cond = torch.randn(2, 8, 5, 5), torch.randn(2, 12)
    h = F.conv2d(x, block.depthwise.weight, block.depthwise.bias, padding=3, groups=8).permute(0, 2, 3, 1)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm.weight
    h = F.gelu(F.linear(h, block.channelwise_linear_1.weight, block.channelwise_linear_1.bias))
    gx = torch.norm(h, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    h = block.channelwise_norm.bias + (block.channelwise_norm.weight * nx + 1) * h
    h = F.linear(h, block.channelwise_linear_2.weight, block.channelwise_linear_2.bias).permute(0, 3, 1, 2)
    y = x + h
    scale, shift = F.linear(F.silu(cond), block.cond_embeds_mapper.weight, block.cond_embeds_mapper.bias).chunk(2, 1)
    expected = shift[:, :, None, None] + y * (1 + scale[:, :, None, None])
    torch.testing.assert_close(block(x, cond), expected, rtol=1e-5, atol=1e-5)


def test_grn_official_shape_and_zero_init_is_identity():
    grn = GlobalResponseNorm(6)
    assert grn.weight.shape == (1, 1, 1, 6) and grn.bias.shape == (1, 1, 1, 6)
    x = torch.randn(2, 3, 3, 6)
    torch.testing.assert_close(grn(x), x)


def test_generation_shapes_and_time_token(tiny_model):
    z, t = torch.randn(3, 4, 16, 16), torch.tensor([0.0, 0.5, 1.0])
    gen = tiny_model.gen_inputs(z, t)
    assert gen.tokens.shape == (3, 64, 64) and gen.t_emb.shape == (3, 64) and gen.grid == (8, 8)
    # t is scaled x1000 before the sinusoidal embedding: compare with calling the encoder directly.
    _, t_emb, _ = tiny_model.vision_gen_enc_model(z, t * 1000)
    torch.testing.assert_close(gen.t_emb, t_emb)
    prefix = tiny_model.embed_tokens(torch.randint(0, 200, (3, 6)))
    v, inner = tiny_model.forward_gen(prefix, torch.ones(3, 6, dtype=torch.long), z, t, hidden_layer=1)
    assert v.shape == z.shape and inner.shape == (3, 64, 64)
    assert tiny_model.num_gen_tokens((16, 16)) == 64


def test_understanding_embeds_replace_image_positions(tiny_model):
    tok = ByteTokenizer()
    n = tiny_model.vision_und_enc_model.num_patches
    ids = torch.tensor([expand_image_tokens(tok.encode(und_prompt("what color?", "")), tok, n)])
    mask = image_seq_mask(ids, tok)
    pixels = torch.randn(1, 3, 32, 32)
    embeds = tiny_model.und_inputs_embeds(ids, pixels, mask)
    images = tiny_model.encode_und_images(pixels)[0]
    torch.testing.assert_close(embeds[0, mask[0]], images)
    torch.testing.assert_close(embeds[0, mask[0]][0], tiny_model.beg_of_und_embed[0])  # <begin_of_image>
    text = tiny_model.embed_tokens(ids)
    torch.testing.assert_close(embeds[0, ~mask[0]], text[0, ~mask[0]])
    out = tiny_model.forward_und(ids, torch.ones_like(ids), pixels, mask, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 272) and torch.isfinite(out.loss)


def test_save_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "multi_modality"
    assert cfg["vision_gen_enc_config"]["cls"] == "ShallowUViTEncoder"
    loaded = JanusFlow.from_pretrained(tmp_path)
    assert loaded.config == tiny_model.config
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def official_config_json(model: JanusFlow) -> dict:
    """config.json as the official MultiModalityConfig.to_dict() writes it (generic fields included)."""
    cfg = model.config
    generic = {"return_dict": True, "output_hidden_states": False, "torchscript": False, "dtype": "bfloat16",
               "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "architectures": None,
               "_name_or_path": "", "transformers_version": "4.38.2", "add_cross_attention": False}
    lang = {**generic, "model_type": "llama", "hidden_size": cfg.llm.hidden_size,
            "intermediate_size": cfg.llm.intermediate_size, "num_hidden_layers": cfg.llm.num_hidden_layers,
            "num_attention_heads": cfg.llm.num_attention_heads, "num_key_value_heads": cfg.llm.num_key_value_heads,
            "vocab_size": cfg.llm.vocab_size, "max_position_embeddings": cfg.llm.max_position_embeddings,
            "rms_norm_eps": cfg.llm.rms_norm_eps, "rope_theta": cfg.llm.rope_theta, "hidden_act": "silu",
            "torch_dtype": "bfloat16"}
    und = cfg.und_encoder
    return {
        **generic, "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality",
        "language_config": lang,
        "vision_und_enc_config": {**generic, "model_type": "vision_und_enc", "cls": "CLIPVisionTower", "params": {
            "model_name": und.model_name, "image_size": und.image_size, "select_feature": "same",
            "select_layer": und.select_layer, "patch_size": und.patch_size, "width": und.width, "layers": und.layers,
            "heads": und.heads, "mlp_ratio": und.mlp_ratio}},
        "vision_gen_enc_config": {**generic, "model_type": "vision_gen_enc", "cls": "ShallowUViTEncoder", "params": {
            "input_channels": 4, "stride": 2, "kernel_size": 2, "block_out_channels": [cfg.gen_encoder.channels],
            "layers_in_middle": 2, "hidden_size": cfg.llm.hidden_size, "elementwise_affine": True, "use_bias": True,
            "norm_eps": 1e-6, "dropout": 0.0, "use_mid_block": True}},
        "vision_gen_dec_config": {**generic, "model_type": "vision_gen_dec", "cls": "ShallowUViTDecoder", "params": {
            "in_channels": cfg.gen_encoder.channels, "out_channels": 4,
            "block_out_channels": [cfg.gen_encoder.channels],
            "upsamples": 1, "layers_in_middle": 2, "hidden_size": cfg.llm.hidden_size, "elementwise_affine": True,
            "norm_eps": 1e-6, "use_bias": True, "dropout": 0.0, "use_mid_block": True}},
    }


def test_from_pretrained_reads_official_layout_with_sharded_bin(tiny_model, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(official_config_json(tiny_model)))
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items() if "attn_pool" not in k}
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, tmp_path / name)
        weight_map.update({k: name for k in ks})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = JanusFlow.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.config.llm == tiny_model.config.llm
    assert loaded.config.gen_encoder == tiny_model.config.gen_encoder
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mismatched_checkpoint_names_the_keys(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    other = JanusFlow(model_config("tiny", gen_encoder={"channels": 24}))
    with pytest.raises(ValueError, match="vision_gen_enc_model.in_conv.weight"):
        other.load_checked_state_dict(tiny_model.state_dict(), "ckpt")
    sd = tiny_model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["vision_gen_dec_aligner.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): vision_gen_dec_aligner.bias") as e:
        tiny_model.load_checked_state_dict(sd, "ckpt")
    assert "extra.weight" in str(e.value)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JanusFlow.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        JanusFlow.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="multi_modality"):
        JanusFlow.from_pretrained(tmp_path)
