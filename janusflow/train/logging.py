"""Run logging on rank 0: wandb (offline unless asked), metrics.jsonl, a progress bar, sample grids.

wandb runs land under ``<run_dir>/wandb``; the mode is WANDB_MODE when set, else the recipe's
``logging.wandb_mode`` (offline by default: with no network, online mode would hang). The same
numbers go to ``<run_dir>/metrics.jsonl``, one JSON object per logged step, which our own plots
and tables read.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from janusflow.config import LoggingConfig
from janusflow.io import read_jsonl_records
from janusflow.train.distributed import rank


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, config: dict, enabled: bool = True,
                 run_name: str | None = None, group: str | None = None):
        self.run_dir, self.cfg, self.enabled = run_dir, cfg, enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        if mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.project, group=group or cfg.group, name=run_name or cfg.run_name,
                                    id=run_id, resume="allow", dir=str(run_dir), mode=mode, config=config,
                                    settings=wandb.Settings(silent=True, console="off"))

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop metrics the interrupted run logged after the checkpoint it resumes from."""
        if not self.enabled or not self.metrics_path.exists():
            return
        rows = read_jsonl_records(self.metrics_path)  # a line cut short by a kill is dropped
        keep = [r for r in rows if not (r.get("stage") == stage and r["step"] > step)]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def start_bar(self, stage: str, start: int, total: int) -> None:
        if self.enabled and self.cfg.progress_bar:
            self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, disable=None)
        self._t0, self._s0 = time.time(), start

    def log(self, stage: str, step: int, global_step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"stage": stage, "step": step, "global_step": global_step, "time": time.time(), **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{k}": v for k, v in metrics.items()} | {"stage_step": step}, step=global_step)

    def update_bar(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {k: metrics[k] for k in ("loss", "loss_rf", "loss_und", "loss_repa") if k in metrics}
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()} | {"s/step": f"{metrics['step_time']:.2f}"})

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_image(self, key: str, path: Path, caption: str, global_step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=global_step)

    def finish(self) -> None:
        self.close_bar()
        if self.wandb is not None:
            self.wandb.finish()
