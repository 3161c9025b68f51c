"""Checkpoints: an interrupted write never becomes `latest`; kill -9 at random points resumes exactly."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from janusflow.train.checkpoint import CheckpointManager
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


class FakeEngine:
    """Writes DeepSpeed-like files; can die half-way through a save."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_checkpoint(self, root, tag, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if self.crash:
            raise KeyboardInterrupt("killed mid-write")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"ok")


def test_interrupted_save_never_becomes_latest(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep=2)
    ckpt.save(FakeEngine(), 10, {"step": 10})
    assert ckpt.latest() == "step-000010"
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(FakeEngine(crash=True), 20, {"step": 20})
    assert ckpt.latest() == "step-000010"
    assert (tmp_path / "step-000020.tmp").exists()
    ckpt.clean_incomplete()
    assert not (tmp_path / "step-000020.tmp").exists()
    for step in (20, 30):
        ckpt.save(FakeEngine(), step, {"step": step})
    assert ckpt.latest() == "step-000030"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-000020", "step-000030"]
    assert torch.load(tmp_path / "step-000030" / "state.pt")["step"] == 30


def _metrics(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r["stage"] == "adaptation"}


def _cmd(run: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), "--recipe", "tiny", f"run_dir={run}",
            "stages.0.max_steps=8", "train.save_every=1", "--stop-after-steps", "8"]


def test_kill_9_at_random_points_then_resume_matches(tmp_path):
    env = {**subprocess_env(), "JANUSFLOW_CACHE": str(tmp_path / "_cache"), "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "disabled"}
    subprocess.run(_cmd(tmp_path / "ref"), env=env, check=True, capture_output=True, timeout=600)
    ref = _metrics(tmp_path / "ref")
    run = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(_cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()
        # Kill at a random moment after training has started (so during steps and checkpoint writes).
        while proc.poll() is None and not (run / "metrics.jsonl").exists() and time.time() - start < 300:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        latest = run / "stages" / "1-adaptation" / "checkpoints" / "latest"
        if latest.exists():
            assert not latest.read_text().endswith(".tmp")
    subprocess.run(_cmd(run), env=env, check=True, capture_output=True, timeout=600)
    got = _metrics(run)
    assert kills >= 1
    assert sorted(got) == list(range(1, 9))
    assert got == ref  # bit-identical losses after any number of kills
