"""The sampler sweep (janusflow.eval.sampler_sweep, tools/sweep_samplers.py): NFE, GenEval and FD per setting."""

import json

import pytest
from PIL import Image

from janusflow.data.shapes import write_shapes_dataset
from janusflow.eval import metrics, shapes_geneval
from janusflow.eval.runner import load_eval_data
from janusflow.eval.sampler_sweep import SamplerSetting, default_settings, evaluate_setting, fd_features, markdown_table
from janusflow.pipeline import load_pipeline
from tests.model_dirs import exported_dir
from tests.test_pipeline import load_tool


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data_dir = write_shapes_dataset(root / "shapes", num_train=2, num_val=6, image_size=32, max_objects=2, seed=0)
    return exported_dir(root), data_dir


def test_rows_count_nfe_and_score_what_was_drawn(setup):
    export, data_dir = setup
    pipe, data = load_pipeline(export), load_eval_data(data_dir, 4, num_vqa=1)
    kw = dict(num_geneval_per_category=1, num_fd_images=4, seed=1, batch_size=4)
    euler = evaluate_setting(pipe, data, SamplerSetting("e", steps=3), **kw)
    heun = evaluate_setting(pipe, data, SamplerSetting("h", "heun", 2, time_shift=2.0), **kw)
    assert euler.nfe == 3 and heun.nfe == 4  # torchdiffeq's Heun: two evaluations per step
    specs = shapes_geneval.make_prompts(1, 1, max_count=data.max_count)
    drawn = pipe.generate([s.prompt for s in specs], seed=1, steps=3, batch_size=4)
    assert euler.geneval == shapes_geneval.evaluate(drawn, specs) and len(euler.samples) == 6
    fake = pipe.generate(data.captions[:4], seed=1, steps=3, batch_size=4)
    expected_fd = metrics.frechet_distance_of(fd_features(pipe, fake), fd_features(pipe, data.images[:4]))
    assert euler.fd == pytest.approx(expected_fd) and heun.fd != euler.fd
    table = markdown_table([euler, heun]).splitlines()
    assert len(table) == 4 and table[2].startswith("| e | 3 | ") and table[3].startswith("| h | 4 | ")


def test_default_settings_cover_the_issue():
    names = [s.name for s in default_settings()]
    assert names[0] == "euler 30 (official)" and SamplerSetting("x").generate_kwargs() == dict(
        solver="euler", steps=30, time_shift=1.0, cfg_interval=(0.0, 1.0))
    assert {"euler 15 shift 3", "euler 10 interval 0.15-0.8", "heun 8", "dopri5 (rtol 1e-4)"} <= set(names)


def test_tool_writes_table_json_and_grid(setup, tmp_path, capsys):
    export, data_dir = setup
    main = load_tool("sweep_samplers.py").main
    out, grid = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["--model", str(export), "--data", str(data_dir), "--num-geneval", "1", "--num-fd-images", "4",
                 "--only", "3", "4", "--out", str(out), "--grid", str(grid), "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"]["name"] for r in rows] == ["euler 15 interval 0.15-0.8", "euler 15 shift 3 + interval"]
    assert rows[1]["setting"]["time_shift"] == 3.0 and rows[0]["nfe"] == 15
    assert "| euler 15 shift 3 + interval | 15 |" in capsys.readouterr().out
    assert Image.open(grid).height == 2 * 128  # a row per setting
    assert main(["--model", str(export), "--data", str(data_dir), "--only", "99"]) == 2
