"""`make rehearsal`, shortened: the 1.3B recipe at official widths, 2 blocks deep, packed, ZeRO-3 on 2 CPU ranks, from
an official-layout model directory to an exported model and one sampled image. Minutes and ~18 GB of memory on
2 cores (two ranks of up to ~9 GB each), so it runs only with JANUSFLOW_SLOW_TESTS=1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not os.environ.get("JANUSFLOW_SLOW_TESTS"),
                    reason="the rehearsal takes minutes and ~18 GB (set JANUSFLOW_SLOW_TESTS=1)")
def test_rehearsal_runs_the_real_recipe_end_to_end(tmp_path):
    out = tmp_path / "rehearsal"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "rehearsal.py"), "--out", str(out), "--steps", "1",
                           "--num-images", "6"], env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "run" / "export" / "config.json").read_text())
    assert config["language_config"]["hidden_size"] == 2048 and config["language_config"]["num_hidden_layers"] == 2
    assert list((out / "samples").glob("*.png"))
    assert "peak memory per rank" in proc.stdout and "ZeRO-3" in proc.stdout and "ZeRO stage 3" in proc.stdout
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"adaptation", "pretrain", "sft"}
