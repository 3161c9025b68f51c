"""The inference pipeline and its tools: seeds, sample.py / chat.py CLIs, errors, the Gradio demo."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janusflow.config import CodecConfig
from janusflow.export import export_model
from janusflow.models.codec import LatentCodec
from janusflow.pipeline import PipelineError, load_pipeline
from janusflow.tokenizer import ByteTokenizer
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares above a green triangle", "a star"]


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    torch.manual_seed(0)
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    return export_model(tmp_path / "export", tiny_model, codec, ByteTokenizer(), "You are a test assistant.")


@pytest.fixture
def pipe(model_dir):
    return load_pipeline(model_dir)


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, f"tools/{tool}", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def load_tool(tool: str):
    """A tools/ script as a module (tools/ is not a package), to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(f"tool_{tool[:-3]}", ROOT / "tools" / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_same_seed_same_images_whatever_the_batch_size(pipe):
    a = pipe.generate(PROMPTS, seed=7, steps=4, batch_size=3)
    b = pipe.generate(PROMPTS, seed=7, steps=4, batch_size=3)
    c = pipe.generate(PROMPTS, seed=7, steps=4, batch_size=1)
    assert np.array_equal(pixels(a), pixels(b))
    # Batching changes the left padding and the matmul shapes: equal up to float rounding of one uint8 level.
    assert np.abs(pixels(a) - pixels(c)).max() <= 1
    assert [im.size for im in a] == [(32, 32)] * 3 and a[0].mode == "RGB"
    assert pipe.last_nfe == 3 * 4 and pipe.last_num_batches == 3


def test_sde_sampling_is_seeded_per_image(pipe):
    a = pipe.generate(PROMPTS, seed=3, steps=4, batch_size=3, solver="sde", sde_noise=2.0)
    b = pipe.generate(PROMPTS, seed=3, steps=4, batch_size=1, solver="sde", sde_noise=2.0)
    ode = pipe.generate(PROMPTS, seed=3, steps=4, batch_size=3)
    assert np.abs(pixels(a) - pixels(b)).max() <= 1  # image i's increments come from (seed, i) alone
    assert np.abs(pixels(a) - pixels(ode)).mean() > 1
    with pytest.raises(PipelineError, match="sde_noise must be"):
        pipe.generate(PROMPTS, solver="sde", sde_noise=float("nan"))


def test_different_seeds_differ(pipe):
    a = pipe.generate(PROMPTS[:1], seed=0, steps=3)
    b = pipe.generate(PROMPTS[:1], seed=1, steps=3)
    assert np.abs(pixels(a) - pixels(b)).mean() > 1


def test_progress_and_errors(pipe):
    seen = []
    pipe.generate(PROMPTS, seed=0, steps=2, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (4, 4) and all(total == 4 for _, total in seen)
    with pytest.raises(PipelineError, match="exceeds the context"):
        pipe.generate(["x" * 500], steps=1)
    with pytest.raises(PipelineError, match="unknown solver"):
        pipe.generate(["x"], solver="leapfrog")


def test_load_errors(model_dir, tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no config.json"):
        load_pipeline(tmp_path / "empty")
    with pytest.raises(PipelineError, match="pass --vae"):
        load_pipeline(model_dir, vae_dir=tmp_path / "no-vae")
    run_dir = model_dir.parent  # a training run directory holding export/
    assert load_pipeline(run_dir, load_vae=False).codec is None


def test_answer(pipe):
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    a = pipe.answer(image, "What colour is it?", max_new_tokens=6)
    assert isinstance(a, str) and a == pipe.answer(image, "What colour is it?", max_new_tokens=6)
    sampled = pipe.answer(image, "What colour is it?", max_new_tokens=6, temperature=1.0, seed=3)
    assert sampled == pipe.answer(image, "What colour is it?", max_new_tokens=6, temperature=1.0, seed=3)


def test_sample_cli_writes_pngs_and_grid(model_dir, tmp_path):
    out = tmp_path / "samples"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a green square\n\n")
    r = run_tool("sample.py", "--model", model_dir, "--prompt", "a red circle", "--prompts", prompts_file,
                 "--num-images", 2, "--steps", 3, "--batch-size", 3, "--seed", 5, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["a-green-square-seed5-002.png", "a-green-square-seed5-003.png", "a-red-circle-seed5-000.png",
                     "a-red-circle-seed5-001.png", "grid-seed5.png"]
    assert Image.open(out / "a-red-circle-seed5-000.png").size == (32, 32)
    assert Image.open(out / "grid-seed5.png").height == 2 * 128  # two rows, tiles enlarged to 128 px
    assert "images/s" in r.stdout and "NFE 3 per batch" in r.stdout


def test_chat_cli_answers(model_dir, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    r = run_tool("chat.py", "--model", model_dir, "--image", image, "--question", "What is it?",
                 "--max-new-tokens", 5, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) > 1


def test_cli_errors_in_subprocess(model_dir, tmp_path):
    for args, message in [
        (["--model", tmp_path / "nope", "--prompt", "x"], f"model directory {tmp_path / 'nope'} does not exist"),
        (["--model", model_dir, "--prompt", "x" * 500], "exceeds the context of 512 tokens"),
    ]:
        r = run_tool("sample.py", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("sample.py: error: ") and message in r.stderr


@pytest.mark.parametrize("tool, args, message", [
    ("sample.py", ["--prompt", "x", "--solver", "leapfrog"], "invalid choice: 'leapfrog'"),
    ("sample.py", ["--prompt", "x", "--solver", "sde", "--sde-noise", "-1"], "--sde-noise must be a number >= 0"),
    ("sample.py", [], "no prompt"),
    ("sample.py", ["--prompts", "/nonexistent/prompts.txt"], "cannot read prompts file /nonexistent/prompts.txt"),
    ("chat.py", ["--image", "/nonexistent/image.png", "--question", "hi"], "cannot read image"),
    ("chat.py", ["--image", "{not_an_image}", "--question", "hi"], "not a readable image"),
])
def test_cli_errors(model_dir, capsys, tool, args, message):
    main = load_tool(tool).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), *(a.format(not_an_image=model_dir / "config.json") for a in args)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err
    assert ": error: " in err.splitlines()[-1]  # argparse names the program after sys.argv[0] in-process


def test_demo_builds_headless_and_handlers_work(pipe):
    demo = load_tool("demo.py")
    import gradio as gr

    assert isinstance(demo.build_demo(pipe), gr.Blocks)
    images = demo.generate_images(pipe, "a red circle", seed=1, cfg_weight=2.0, steps=2, num_images=2)
    assert len(images) == 2 and images[0].size == (384, 384)
    assert isinstance(demo.answer_question(pipe, images[0], "What is it?", max_new_tokens=4), str)
    with pytest.raises(gr.Error):
        demo.answer_question(pipe, None, "What is it?")
