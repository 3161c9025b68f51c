"""tools/generate_benchmark.py: GenEval / DPG-Bench / MJHQ-30K layouts on disk, per-prompt seeds, resuming."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from janusflow.eval.benchmarks import read_dpg, read_geneval, read_mjhq, tile_2x2
from janusflow.pipeline import load_pipeline
from tests.conftest import subprocess_env
from tests.model_dirs import exported_dir, official_dirs
from tests.test_pipeline import ROOT, load_tool, pixels

GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "red"}], "prompt": "a photo of a red cow"}',
    '{"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}], '
    '"prompt": "a photo of two cups"}',
]
DPG_PROMPTS = {"0": "A red circle above a blue square.", "1": "Two green triangles on a grey floor.",
               "partiprompts7": "A yellow cross, drawn large, in the middle of a white page."}
MJHQ_META = {"126c23ae": {"category": "plants", "prompt": "a tropical garden, bright colours"},
             "9f1e0b77": {"category": "animals", "prompt": "a cat on a sofa"},
             "00aa11bb": {"category": "plants", "prompt": "a cactus in a pot"}}
FAST = ["--steps", "2", "--batch-size", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Hand-made 3-prompt files in each benchmark's format."""
    root = tmp_path_factory.mktemp("prompts")
    (root / "evaluation_metadata.jsonl").write_text("\n".join(GENEVAL_LINES) + "\n")
    (root / "dpg").mkdir()
    for stem, prompt in DPG_PROMPTS.items():
        (root / "dpg" / f"{stem}.txt").write_text(prompt + "\n")
    (root / "meta_data.json").write_text(json.dumps(MJHQ_META))
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return exported_dir(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return official_dirs(tmp_path_factory.mktemp("official"))


def run(*args) -> int:
    return load_tool("generate_benchmark.py").main([str(a) for a in args])


def test_prompt_files_read_as_items(files):
    geneval = read_geneval(files / "evaluation_metadata.jsonl")
    assert [(i.index, i.key, i.prompt) for i in geneval] == [
        (0, "00000", "a photo of a bench"), (1, "00001", "a photo of a red cow"), (2, "00002", "a photo of two cups")]
    assert geneval[2].line == GENEVAL_LINES[2]
    assert [(i.key, i.prompt) for i in read_dpg(files / "dpg")] == sorted(DPG_PROMPTS.items())
    assert [i.key for i in read_mjhq(files / "meta_data.json")] == ["plants/126c23ae", "animals/9f1e0b77",
                                                                    "plants/00aa11bb"]


def test_geneval_layout_and_per_prompt_seeds(files, export, tmp_path):
    out = tmp_path / "geneval"
    assert run("geneval", "--model", export, "--metadata", files / "evaluation_metadata.jsonl", "--out", out,
               "--images-per-prompt", 2, "--seed", 3, *FAST) == 0
    assert sorted(os.listdir(out)) == ["00000", "00001", "00002"]
    pipe = load_pipeline(export)
    for p, line in enumerate(GENEVAL_LINES):
        folder = out / f"{p:05d}"
        assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
        with open(folder / "metadata.jsonl") as fp:  # GenEval reads the file with json.load
            assert json.load(fp) == json.loads(line)
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png"]
        drawn = [Image.open(folder / "samples" / f"{k:04d}.png") for k in range(2)]
        alone = pipe.generate([json.loads(line)["prompt"]] * 2, seed=3, steps=2, image_indices=[2 * p, 2 * p + 1])
        assert drawn[0].size == (32, 32) and np.abs(pixels(drawn) - pixels(alone)).max() <= 1


def test_dpg_layout_is_a_2x2_grid_per_prompt_file(files, export, tmp_path):
    out = tmp_path / "dpg"
    assert run("dpg", "--model", export, "--prompts", files / "dpg", "--out", out, *FAST) == 0
    assert sorted(os.listdir(out)) == [f"{stem}.png" for stem in sorted(DPG_PROMPTS)]
    pipe = load_pipeline(export)
    p, stem = 1, "1"  # sorted stems: "0", "1", "partiprompts7"
    grid = Image.open(out / f"{stem}.png")
    assert grid.size == (64, 64)
    alone = pipe.generate([DPG_PROMPTS[stem]] * 4, seed=0, steps=2, image_indices=[4 * p + k for k in range(4)])
    crops = [grid.crop(box) for box in [(0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64)]]
    assert np.abs(pixels(crops) - pixels(alone)).max() <= 1  # the boxes compute_dpg_bench.py crops


def test_tile_2x2_places_images_row_by_row():
    images = [Image.new("RGB", (2, 2), (60 * k, 0, 0)) for k in range(4)]
    grid = np.asarray(tile_2x2(images))
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 60 and grid[3, 0, 0] == 120 and grid[3, 3, 0] == 180
    with pytest.raises(ValueError, match="4 images of one size"):
        tile_2x2(images[:3])


def test_mjhq_layout_and_resume(files, export, tmp_path):
    out = tmp_path / "mjhq"
    args = ["mjhq", "--model", export, "--meta", files / "meta_data.json", "--out", out, *FAST]
    assert run(*args) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "animals/9f1e0b77.png", "plants/00aa11bb.png", "plants/126c23ae.png"]
    first = {p.name: (p.stat().st_mtime_ns, np.asarray(Image.open(p))) for p in out.rglob("*.png")}
    (out / "plants" / "00aa11bb.png").unlink()
    (out / "plants" / ".stale.png.tmp").write_bytes(b"half a file")  # what a killed run leaves behind
    assert run(*args) == 0
    again = {p.name: (p.stat().st_mtime_ns, np.asarray(Image.open(p))) for p in out.rglob("*.png")}
    assert not (out / "plants" / ".stale.png.tmp").exists()
    for name in ("9f1e0b77.png", "126c23ae.png"):
        assert again[name][0] == first[name][0]  # finished prompts are skipped
    redrawn = again["00aa11bb.png"][1].astype(int) - first["00aa11bb.png"][1].astype(int)
    assert np.abs(redrawn).max() <= 1  # ... and the missing one is drawn from its own noise again


def test_geneval_resume_rejects_another_metadata_file(files, export, tmp_path, capsys):
    out = tmp_path / "geneval"
    base = ["--model", export, "--out", out, "--images-per-prompt", 1, "--limit", 1, *FAST]
    assert run("geneval", "--metadata", files / "evaluation_metadata.jsonl", *base) == 0
    other = tmp_path / "other.jsonl"
    other.write_text(GENEVAL_LINES[1] + "\n")
    assert run("geneval", "--metadata", other, *base) == 2
    assert "00000/metadata.jsonl holds another prompt than line 1 of the metadata file" in capsys.readouterr().err


@pytest.mark.parametrize("benchmark, flag, name", [("geneval", "--metadata", "evaluation_metadata.jsonl"),
                                                   ("dpg", "--prompts", "dpg"), ("mjhq", "--meta", "meta_data.json")])
def test_official_layout_model(files, official, tmp_path, benchmark, flag, name):
    model_dir, vae_dir = official
    out = tmp_path / benchmark
    assert run(benchmark, "--model", model_dir, "--vae", vae_dir, flag, files / name, "--out", out, "--limit", 1,
               "--steps", 1, "--device", "cpu") == 0
    sizes = {Image.open(p).size for p in out.rglob("*.png")}
    assert sizes == ({(768, 768)} if benchmark == "dpg" else {(384, 384)})


def test_cli_in_a_subprocess(files, export, tmp_path):
    r = subprocess.run([sys.executable, "tools/generate_benchmark.py", "mjhq", "--model", str(export), "--meta",
                        str(files / "meta_data.json"), "--out", str(tmp_path / "m"), "--limit", "1", "--steps", "1"],
                       cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 prompts drawn, 0 already done" in r.stdout and "tools/fid.py" in r.stdout


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"tag": "x"', "bad.jsonl, line 2: not valid JSON"),
    ('{"prompt": "ok"}\n{"tag": "x"}', "bad.jsonl, line 2: no \"prompt\" string"),
    ("\n\n", "bad.jsonl holds no prompts"),
])
def test_bad_geneval_metadata_names_the_line(export, tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    assert run("geneval", "--model", export, "--metadata", tmp_path / "bad.jsonl", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("generate_benchmark.py: error: ") and message in err


def test_bad_inputs(export, tmp_path, capsys):
    (tmp_path / "meta.json").write_text(json.dumps({"x/y": {"category": "plants", "prompt": "p"}}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "3.txt").write_text(" \n")
    for args, message in [(["mjhq", "--meta", tmp_path / "meta.json"], "'x/y' is not a usable file or folder name"),
                          (["mjhq", "--meta", tmp_path / "none.json"], "cannot read"),
                          (["dpg", "--prompts", tmp_path / "empty"], "3.txt is empty"),
                          (["dpg", "--prompts", tmp_path / "nodir"], "is not a folder of DPG-Bench prompt files")]:
        assert run(*args, "--model", export, "--out", tmp_path / "o") == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("dpg", "--model", export, "--prompts", tmp_path, "--out", tmp_path / "o", "--cfg-interval", "0.9", "0.1")
    assert "--cfg-interval must satisfy" in capsys.readouterr().err
