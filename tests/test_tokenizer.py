"""The byte-level BPE of the embedded default: training, round trips, the prep step and the exported model."""

import pytest

from janusflow.config import ConfigError, load_recipe
from janusflow.tokenizer import (
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    IMAGE,
    ByteTokenizer,
    HFTokenizer,
    gen_prompt,
    train_bpe_tokenizer,
    und_prompt,
)

CORPUS = [gen_prompt(f"a {c} {k} to the left of a {c2} {k2}")
          for c in ("red", "blue", "green") for c2 in ("purple", "yellow") for k in ("circle", "square")
          for k2 in ("triangle", "cross")] * 5


def test_bpe_round_trips_any_text_and_shortens_prompts(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, 400, tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 400
    ids = tok.encode(gen_prompt("a red circle to the left of a purple triangle"))
    assert ids[0] == tok.bos_id and ids[-1] == tok.boi_id
    assert len(ids) * 3 < len(ByteTokenizer().encode(gen_prompt("a red circle to the left of a purple triangle")))
    # Text the BPE never saw still encodes (every byte is in the alphabet) and decodes back unchanged.
    odd = "Ünïcödé ✓ 123 {json: [1, 2]}\n\ttabs"
    assert tok.decode(tok.encode(odd, add_bos=False)) == odd
    # Special tokens are single ids, also inside text.
    text = und_prompt("What color is it?", "").replace(IMAGE, BEGIN_OF_IMAGE + IMAGE * 3 + END_OF_IMAGE)
    ids = tok.encode(text)
    assert ids.count(tok.image_id) == 3 and ids.count(tok.boi_id) == 1 and ids.count(tok.eoi_id) == 1
    assert len({tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id, tok.boi_id, tok.eoi_id}) == 6


def test_bpe_is_deterministic(tmp_path):
    a = train_bpe_tokenizer(CORPUS, 300, tmp_path / "a")
    b = train_bpe_tokenizer(CORPUS, 300, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert a.encode(CORPUS[0]) == b.encode(CORPUS[0])


@pytest.mark.parametrize("overrides, match", [
    (["prep.tokenizer_vocab_size=100"], ">= 263"),
    (["prep.tokenizer_vocab_size=400", "model.llm.vocab_size=300"], "larger than model.llm.vocab_size"),
    (["prep.tokenizer_vocab_size=300", "model.llm.vocab_size=300", "data.shapes.enabled=false"], "shapes.enabled"),
])
def test_bpe_recipe_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe("tiny", overrides)
    assert "prep.tokenizer_vocab_size" in str(e.value)


def test_training_with_the_prep_bpe_exports_it(tmp_path, monkeypatch):
    from janusflow.pipeline import load_pipeline
    from janusflow.train.trainer import Trainer

    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "_cache"))
    recipe = load_recipe("tiny", [f"run_dir={tmp_path / 'run'}", "prep.tokenizer_vocab_size=320",
                                  "model.llm.vocab_size=320", "stages.0.max_steps=1", "stages.1.max_steps=1",
                                  "stages.2.max_steps=1", "logging.wandb_mode=disabled"])
    Trainer(recipe).run()
    assert len(list((tmp_path / "_cache").glob("tokenizer-*"))) == 1
    pipe = load_pipeline(tmp_path / "run" / "export")
    assert isinstance(pipe.tokenizer, HFTokenizer) and pipe.tokenizer.vocab_size == 320
    prompt = gen_prompt("a red circle")
    assert len(pipe.tokenizer.encode(prompt)) * 2 < len(ByteTokenizer().encode(prompt))
    assert pipe.generate(["a red circle"], seed=0, steps=2)[0].size == (32, 32)
