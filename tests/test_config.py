"""Config loading, overrides and validation errors that name the key."""

from pathlib import Path

import pytest

from janusflow.config import ConfigError, Recipe, apply_overrides, from_dict, load_recipe, model_config

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_defaults_are_official():
    cfg = model_config("janusflow-1.3b")
    assert cfg.llm.hidden_size == 2048 and cfg.llm.num_hidden_layers == 24 and cfg.llm.vocab_size == 102400
    assert cfg.gen_encoder.channels == 768 and cfg.gen_encoder.stride == 2 and cfg.und_encoder.width == 1024
    assert cfg.llm.intermediate_size == 5632 and cfg.llm.max_position_embeddings == 16384  # DeepSeek-LLM-1.3B's


def test_preset_with_overrides():
    cfg = model_config("tiny", llm={"num_hidden_layers": 3})
    assert cfg.llm.num_hidden_layers == 3 and cfg.llm.hidden_size == 64


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"lr_typo": 1}}, "train.lr_typo"),
        ({"train": {"zero_stage": 7}}, "train.zero_stage"),
        ({"train": {"ema_decay": "high"}}, "train.ema_decay"),
        ({"train": {"grad_clip": -1.0}}, "train.grad_clip"),
        ({"stages": [{"max_steps": 0}]}, "stages.0.max_steps"),
        ({"stages": [{"policy": "stage9"}]}, "stages.0.policy"),
        ({"stages": [{"max_steps": 10, "decay_steps": 11}]}, "stages.0.decay_steps"),
        ({"prep": {"llm_steps": 5}, "llm_path": "/some/llm"}, "prep.llm_steps"),
        ({"prep": {"llm_batch_size": 0}}, "prep.llm_batch_size"),
        ({"model": {"preset": "huge"}}, "model.preset"),
        ({"model": {"llm": {"hidden_size": 65}}}, "model.llm.hidden_size"),
        ({"data": {"gen": [{"format": "parquet"}]}}, "data.gen.0.format"),
        ({"logging": {"sample_solver": "ddim"}}, "logging.sample_solver"),
        ({"logging": {"sample_sde_noise": -0.5}}, "logging.sample_sde_noise"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(Recipe, data)
    assert key in str(e.value)


def test_overrides_dotted_and_indexed():
    data = {"train": {"seed": 1}, "stages": [{"max_steps": 5}, {"max_steps": 6}]}
    out = apply_overrides(data, ["train.seed=3", "stages.1.max_steps=9", "logging.project=x"])
    assert out["train"]["seed"] == 3 and out["stages"][1]["max_steps"] == 9 and out["logging"]["project"] == "x"
    with pytest.raises(ConfigError, match="stages.4"):
        apply_overrides(data, ["stages.4.max_steps=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(data, ["stages"])


def test_missing_recipe_is_clear():
    with pytest.raises(ConfigError, match="no_such_recipe"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(str(path))
    assert recipe.stages and recipe.name


def test_exponent_floats_without_a_dot_are_numbers():
    # YAML 1.1 reads 1e-3 as a string; an lr written that way must still load.
    assert load_recipe("tiny", ["stages.0.lr=1e-3"]).stages[0].lr == 1e-3


def test_a_users_recipe_anywhere_can_start_from_a_shipped_one(tmp_path, monkeypatch):
    mine = tmp_path / "elsewhere" / "my-sft.yaml"
    mine.parent.mkdir()
    mine.write_text("base: janusflow-1.3b-sft\nname: my-sft\nstages:\n  - {name: sft, policy: stage3, max_steps: 7, "
                    "init_from: /models/JanusFlow-1.3B}\n")
    monkeypatch.chdir(tmp_path)  # neither next to the shipped recipes nor in the repository
    r = load_recipe(str(mine))
    shipped = load_recipe("janusflow-1.3b-sft")
    assert r.name == "my-sft" and r.stages[0].max_steps == 7 and r.data == shipped.data
    (tmp_path / "elsewhere" / "local-base.yaml").write_text("base: tiny\nname: local\n")
    mine.write_text("base: local-base.yaml\ntrain: {seed: 3}\n")  # a file next to it still wins
    r = load_recipe(str(mine))
    assert r.name == "local" and r.train.seed == 3 and r.model.preset == "tiny"
    mine.write_text("base: no-such-recipe\n")
    with pytest.raises(ConfigError, match="no-such-recipe"):
        load_recipe(str(mine))


def test_the_public_api_is_importable_lazily():
    import subprocess
    import sys

    code = ("import sys, janusflow; assert 'janusflow.train.trainer' not in sys.modules; "
            "from janusflow import JanusFlow, Trainer, load_pipeline, load_recipe; "
            "assert load_recipe('tiny').name == 'tiny' and JanusFlow.__name__ == 'JanusFlow' "
            "and callable(load_pipeline) and Trainer.__name__ == 'Trainer'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
