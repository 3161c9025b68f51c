"""Sampler settings against quality on the held-out shapes data: shapes-GenEval and FD per setting, with the NFE.

Every setting draws the same prompts from the same starting noise (one seed), so the rows differ only by
the sampler. NFE counts velocity evaluations per image (each one CFG-doubled); the CFG interval does not
lower it here, because the unconditional rows are still computed outside the interval (their result unused).

    data = load_eval_data(shapes_dir, num_images=128, num_vqa=1)
    rows = [evaluate_setting(pipe, data, s, num_geneval_per_category=32, num_fd_images=128) for s in SETTINGS]
    print(markdown_table(rows))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from janusflow.eval import metrics, shapes_geneval
from janusflow.eval.runner import EvalData
from janusflow.pipeline import Pipeline

TABLE_COLUMNS = ("overall", "single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class SamplerSetting:
    """One sampler: a solver, its steps and the two options of janusflow.sampling."""

    name: str
    solver: str = "euler"
    steps: int = 30
    time_shift: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)

    def generate_kwargs(self) -> dict:
        return dict(solver=self.solver, steps=self.steps, time_shift=self.time_shift, cfg_interval=self.cfg_interval)


def default_settings(shift: float = 3.0, interval: tuple[float, float] = (0.15, 0.8)) -> list[SamplerSetting]:
    """Euler 30 / 15 / 10 with and without the shift and the interval, Heun at NFE 30 and 16, dopri5.

    The default interval is EDM2's guidance interval (Kynkaenniemi et al. 2024), sigma in (0.28, 5.42], on
    our path: sigma = (1 - t) / t, i.e. t = 1 / (1 + sigma) in [0.16, 0.78], rounded to [0.15, 0.8]."""
    settings = [SamplerSetting("euler 30 (official)")]
    for steps in (15, 10):
        settings += [SamplerSetting(f"euler {steps}", steps=steps),
                     SamplerSetting(f"euler {steps} shift {shift:g}", steps=steps, time_shift=shift),
                     SamplerSetting(f"euler {steps} interval {interval[0]:g}-{interval[1]:g}", steps=steps,
                                    cfg_interval=interval),
                     SamplerSetting(f"euler {steps} shift {shift:g} + interval", steps=steps, time_shift=shift,
                                    cfg_interval=interval)]
    return settings + [SamplerSetting("heun 15", "heun", 15), SamplerSetting("heun 8", "heun", 8),
                       SamplerSetting(f"heun 8 shift {shift:g}", "heun", 8, time_shift=shift),
                       SamplerSetting("dopri5 (rtol 1e-4)", "dopri5")]


@dataclass
class SweepRow:
    setting: SamplerSetting
    nfe: float
    geneval: dict[str, float]
    fd: float
    seconds: float
    samples: list[Image.Image] = field(default_factory=list, repr=False)
    """The first GenEval images, for a side-by-side grid."""


@torch.no_grad()
def evaluate_setting(pipe: Pipeline, data: EvalData, setting: SamplerSetting, *, num_geneval_per_category: int,
                     num_fd_images: int, real_features: torch.Tensor | None = None, cfg_weight: float = 2.0,
                     seed: int = 0, batch_size: int = 32, keep_samples: int = 8) -> SweepRow:
    """shapes-GenEval on ``num_geneval_per_category`` prompts per category and FD on ``num_fd_images`` captions."""
    specs = shapes_geneval.make_prompts(seed, num_geneval_per_category, max_count=data.max_count)
    kwargs = dict(seed=seed, cfg_weight=cfg_weight, batch_size=batch_size, **setting.generate_kwargs())
    start = time.perf_counter()
    images = pipe.generate([s.prompt for s in specs], **kwargs)
    nfe, batches = pipe.last_nfe, pipe.last_num_batches
    n = min(num_fd_images, len(data.images))
    fake = pipe.generate(data.captions[:n], **kwargs)
    seconds = time.perf_counter() - start
    nfe, batches = nfe + pipe.last_nfe, batches + pipe.last_num_batches
    fd = metrics.frechet_distance_of(fd_features(pipe, fake), real_features if real_features is not None
                                     else fd_features(pipe, data.images[:n]))
    return SweepRow(setting, nfe / batches, shapes_geneval.evaluate(images, specs), fd, seconds, images[:keep_samples])


def fd_features(pipe: Pipeline, images: list[Image.Image]) -> torch.Tensor:
    """The FD features of janusflow.eval.runner: the model's understanding encoder, mean-pooled [N, D]."""
    und = pipe.model.config.und_encoder
    return metrics.encoder_features(pipe.model.vision_und_enc_model, images, und)


def markdown_table(rows: list[SweepRow]) -> str:
    """One line per setting: NFE, shapes-GenEval overall and per category, FD, seconds."""
    head = ["setting", "NFE", *(f"GenEval {c}" if c == "overall" else c for c in TABLE_COLUMNS), "FD", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.setting.name, f"{r.nfe:g}", *(f"{r.geneval.get(c, float('nan')):.2f}" for c in TABLE_COLUMNS),
                 f"{r.fd:.2f}", f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
