"""Beyond one rank: ZeRO-3 equals ZeRO-2 on 2 ranks, and 2 "nodes" x 1 rank equal 1 node x 2 ranks.

Every run is the whole tiny recipe (three stages, then the export) as CPU ranks with gloo.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import subprocess_env
from tests.test_training import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def _env(cache: Path) -> dict:
    return subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", JANUSFLOW_CACHE=str(cache))


def _train(run: Path, *overrides: str) -> list[str]:
    return [str(ROOT / "tools" / "train.py"), "--recipe", "tiny", f"run_dir={run}", *overrides]


def _torchrun(run: Path, cache: Path, port: int, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *_train(run, *overrides)]
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, cache) -> tuple[Path, str]:
    """1 node x 2 ranks, ZeRO-2: the reference of both tests."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    return run, _torchrun(run, cache, 29541, "train.zero_stage=2")


def _losses(run: Path) -> dict[tuple[str, int], float]:
    return {(r["stage"], r["step"]): r["loss"] for r in read_metrics(run) if "loss" in r}


def _assert_same_run(a: Path, b: Path, rel: float = 1e-5) -> None:
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() and len(la) == 7  # every step of the three stages
    for key in la:
        assert lb[key] == pytest.approx(la[key], rel=rel, abs=1e-6), key
    for part in ("export/model.safetensors", "stages/1-adaptation/final/repa_projector.safetensors",
                 "stages/3-sft/final/repa_projector.safetensors"):
        sa, sb = load_file(str(a / part)), load_file(str(b / part))
        assert sa.keys() == sb.keys(), part
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=f"{part}: {k}")


def _banner_counts(stdout: str) -> list[str]:
    return re.findall(r"stage \w+: (\d+ trainable tensors \([\d.]+M parameters\))", stdout)


def test_zero3_on_two_ranks_equals_zero2(tmp_path, zero2, cache):
    ref, ref_out = zero2
    out = _torchrun(tmp_path / "run", cache, 29542, "train.zero_stage=3")
    _assert_same_run(ref, tmp_path / "run")
    embed = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))["beg_of_und_embed"]
    assert embed.abs().sum() > 0  # a parameter of JanusFlow outside any forward of its own: trained under ZeRO-3
    assert _banner_counts(out) == _banner_counts(ref_out) and len(_banner_counts(out)) == 3
    assert "ZeRO stage 3" in out and "(0.00M parameters)" not in out


def test_two_nodes_of_one_rank_equal_one_node_of_two(tmp_path, zero2, cache):
    """torchrun's multi-node launch (static rendezvous on localhost, one process per "node"), the run_dir and the
    cache shared between the nodes as on a shared filesystem."""
    run = tmp_path / "run"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               "29543", *_train(run, "train.zero_stage=2")], env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=900) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    _assert_same_run(zero2[0], run)
