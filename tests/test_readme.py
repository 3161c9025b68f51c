"""The README is a manual: its Python examples and its sampling and chat commands run as written, on a stand-in
for the default export (``runs/2to8/export``: a tiny model with its own BPE tokenizer, as the default has)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from janusflow.config import CodecConfig
from janusflow.export import export_model
from janusflow.models.codec import LatentCodec
from janusflow.tokenizer import train_bpe_tokenizer
from tests.conftest import randomize, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding runs/2to8/export: a tiny model trained on nothing, with a BPE tokenizer of its own."""
    from janusflow.config import model_config
    from janusflow.models.janusflow import JanusFlow

    work = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = randomize(JanusFlow(model_config("tiny"))).eval()
    tok = train_bpe_tokenizer(["a red circle", "a green triangle", "What color is the shape? red"] * 20,
                              model.config.llm.vocab_size, work / "bpe")
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    export_model(work / "runs" / "2to8" / "export", model, codec, tok, "")
    return work


def _run(cmd: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = subprocess_env(JANUSFLOW_CACHE=str(tmp_path / "_cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_readme_is_a_short_manual_that_names_the_default():
    assert len(README.splitlines()) <= 150
    first_screen = "\n".join(README.splitlines()[:20])
    assert "make pretrain" in first_screen and "make test" in first_screen and "2 : 8" in first_screen


def test_readme_python_examples_run_as_written(workdir, tmp_path):
    examples = _blocks(README, "python")
    assert len(examples) >= 2 and any("load_pipeline" in e for e in examples)
    for code in examples:
        _run([sys.executable, "-c", code], workdir, tmp_path)
    assert (workdir / "red-circle.png").exists() and (workdir / "my-copy" / "model.safetensors").exists()
    assert (workdir / "runs" / "tiny-api" / "export" / "model.safetensors").exists()


def test_readme_sampling_and_chat_commands_run_as_written(workdir, tmp_path):
    lines = [line.split("  #")[0].strip() for block in _blocks(_section("Sampling and chat"), "bash")
             for line in block.splitlines()]
    commands = [line for line in lines if line.startswith(("python tools/sample.py", "python tools/chat.py"))
                and "runs/2to8/export" in line]
    assert [c.split()[1] for c in commands] == ["tools/sample.py", "tools/chat.py"]  # the chat reads the sample
    for command in commands:
        args = shlex.split(command)
        _run([sys.executable, str(ROOT / args[1]), *args[2:]], workdir, tmp_path)
    assert (workdir / "samples" / "a-red-circle-seed0-000.png").exists()


def test_make_test_fails_when_pytest_collects_nothing():
    """A broken collection must fail the README's test command (and so CI), not pass as "no tests ran"."""
    env = subprocess_env(PYTEST_ARGS="-k no_test_has_this_name_xyz --co -p no:cacheprovider")
    proc = subprocess.run(["make", "--no-print-directory", "test"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "no tests collected" in proc.stdout + proc.stderr
