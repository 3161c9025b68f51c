"""REPA on vs off over several seeds: per seed, the recipe's stage 2 trained twice from one stage-1 checkpoint,
evaluated as it trains; the report gives every number as a mean over seeds with its 95% t-interval.

    python tools/compare_repa.py --recipe 2to8 [--seeds 3] [--steps N] [--eval-every N] [--out DIR] [key=value ...]
    make compare-repa RECIPE=2to8 [ARGS="--seeds 5"]

For each seed S in 0 .. --seeds - 1 (default 3), in ``OUT/seed-S`` and with ``train.seed=S``:

1. Stage 1 (adaptation) of the recipe runs once, in ``OUT/seed-S/shared``.
2. Stage 2 runs twice from that same stage-1 checkpoint, in ``OUT/seed-S/repa-on`` (the recipe's REPA weight) and
   ``OUT/seed-S/repa-off`` (weight 0). Everything else (data order, noise, t, CFG dropout, seeds) is the same, so
   the two ``recipe.json`` files differ only in ``stages.1.repa_weight`` (and ``run_dir``).
3. Every ``--eval-every`` steps and at the end, the EMA model is evaluated (janusflow.eval.runner: shapes-GenEval,
   FD in SigLIP space, SigLIP image-text score, VQA accuracy, RF validation loss; the same prompts and sampler
   noise for every seed: ``--seed``) and logged as ``eval/*`` to metrics.jsonl and wandb (offline unless
   WANDB_MODE says otherwise; one group, runs ``repa-on-seedS`` / ``repa-off-seedS`` whose config field ``arm``
   is ``repa-on`` / ``repa-off``: group by it to overlay the arms).
4. ``OUT/seed-S/compare_repa.{md,png,json}``: that seed's report (intervals n/a: one seed).

Then, over the seeds (statistics: janusflow.eval.seeds):

- ``OUT/compare_repa.png``: per metric, each arm's mean curve over seeds with a band of mean ± the 95% t-interval
  (``t(0.975, n - 1) * sd / sqrt(n)``), and each seed's curve as a thin line.
- ``OUT/compare_repa.md``: the REPA speed-up (steps REPA-off needs to reach a level ÷ steps REPA-on needs) to
  equal REPA-off's final FD and shapes-GenEval overall (the headline), and in a table for those, the SigLIP score
  and the RF validation loss at REPA-off's value at about 1/3, 2/3 and the end of its run: per seed from that
  seed's pair of curves, then as mean ± interval over the seeds where both arms reached the level
  (how many did is given; a seed where an arm never does is listed, not dropped); the final numbers per arm as
  mean ± interval, and the paired interval of on - off (whether it excludes 0); the time per seed.
  With ``--seeds 1`` every interval reads "n/a (1 seed)".
- ``OUT/compare_repa.json``: all of it, with every seed's curves.

Run it again to continue an interrupted comparison (every run resumes from its checkpoints, finished ones are
skipped); a larger ``--seeds`` adds seeds to a finished comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from janusflow.config import ConfigError, Recipe, load_recipe
from janusflow.eval import seeds as stats
from janusflow.eval.cli import COMPARISON_DEFAULTS, add_eval_args, check_eval_args
from janusflow.eval.cli import eval_kwargs as eval_kwargs_of
from janusflow.eval.runner import evaluate_model, load_eval_data
from janusflow.eval.seeds import Estimate, at_least_as_good, steps_to_reach
from janusflow.eval.siglip_score import SigLIPJudge
from janusflow.io import read_jsonl_records as read_rows
from janusflow.train.prep import cache_root
from janusflow.train.trainer import Trainer

STAGE = 1  # the compared stage: unified pre-training
ARMS = ("repa-on", "repa-off")
# (metric key, label, lower is better) of the eval rows that get levels and speed-ups
LEVEL_METRICS = (("eval/fd", "FD (SigLIP space)", True), ("eval/geneval/overall", "shapes-GenEval overall", False),
                 ("eval/siglip_score", "SigLIP image-text score", False), ("eval/rf_val", "RF validation loss", True))
HEADLINE = ("eval/fd", "eval/geneval/overall")  # the speed-ups the report opens with
# The levels: REPA-off's value at about these fractions of its run (where better than at its step 0).
PICKS = (("1/3", 1 / 3), ("2/3", 2 / 3), ("end", 1.0))
PANELS = (("eval/fd", "FD vs held-out images (SigLIP space)"), ("eval/geneval/overall", "shapes-GenEval overall"),
          ("eval/siglip_score", "SigLIP image-text score (generated vs prompt)"),
          ("eval/vqa_acc", "VQA accuracy (held-out)"), ("eval/rf_val", "RF validation loss (fixed t, noise)"),
          ("loss_rf", "training loss_rf"), ("loss_repa", "training loss_repa"))


class StageEvaluator:
    """The trainer's evaluation hook for the compared stage: evaluates the EMA model at step 0 and at every sample
    point. Step 0 (the shared stage-1 weights, the same for both arms) is computed once and kept in ``step0_path``."""

    def __init__(self, eval_stage: int, eval_kwargs: dict, data_dir: str | Path | None, step0_path: Path):
        self.eval_stage, self.eval_kwargs, self.data_dir = eval_stage, eval_kwargs, data_dir
        self.step0_path = step0_path
        self.data = self.judge = None

    def __call__(self, trainer: Trainer, index: int, step: int, model) -> dict | None:
        if index != self.eval_stage or trainer.rank != 0:
            return None
        settings = {**self.eval_kwargs, "siglip_dir": trainer.prep.get("siglip_dir")}
        if step == 0 and self.step0_path.exists():
            saved = json.loads(self.step0_path.read_text())
            if saved["settings"] == settings:
                return saved["results"]
        start = time.time()
        results = {**self._evaluate(trainer, model), "seconds": time.time() - start}
        if step == 0:
            self.step0_path.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
        return results

    def _evaluate(self, trainer: Trainer, model) -> dict:
        if self.data is None:
            self.data_dir = self.data_dir or trainer.prep.get("data_dir")
            if self.data_dir is None:
                raise ValueError("the recipe has no shapes dataset to evaluate on; pass --data DIR")
            k = self.eval_kwargs
            self.data = load_eval_data(self.data_dir, max(k["num_fd_images"], k["num_rf_images"]), k["num_vqa"])
            siglip_dir = trainer.prep.get("siglip_dir")
            self.judge = SigLIPJudge.from_dir(siglip_dir).to(trainer.device) if siglip_dir else None
        return evaluate_model(model, trainer.codec, trainer.tokenizer, trainer.recipe.data.und_system_prompt,
                              self.data_dir, data=self.data, siglip_judge=self.judge, **self.eval_kwargs)


class TaggedTrainer(Trainer):
    """A Trainer whose wandb run also carries ``tags`` in its config (``arm``, ``seed``): wandb groups by them."""

    def __init__(self, recipe: Recipe, tags: dict, **kwargs):
        super().__init__(recipe, **kwargs)
        self.tags = tags

    def setup(self) -> None:
        super().setup()
        if self.logger.wandb is not None:
            self.logger.wandb.config.update(self.tags, allow_val_change=True)


# ----------------------------------------------------------------------------- runs


def arm_recipe(recipe: str, overrides: list[str], run_dir: Path, num_stages: int, extra: list[str]) -> Recipe:
    """The recipe with its first ``num_stages`` stages, in ``run_dir``; ``extra`` overrides win."""
    r = load_recipe(recipe, [*overrides, f"run_dir={run_dir}", *extra])
    if len(r.stages) < STAGE + 1:
        raise ConfigError(f"recipe {recipe} has {len(r.stages)} stage(s); the comparison needs stages 1 and 2")
    r.stages = r.stages[:num_stages]
    return r


def arm_extra(weight: float, steps: int, eval_every: int) -> list[str]:
    """The overrides of one arm's run: its REPA weight, the compared stage's steps and the evaluation interval."""
    return [f"stages.{STAGE}.repa_weight={weight}", f"stages.{STAGE}.max_steps={steps}",
            f"logging.sample_every={eval_every}"]


def arm_settings(base: Recipe, steps: int | None, eval_every: int | None) -> tuple[float, int, int]:
    """(REPA weight of the compared stage, its steps, the evaluation interval); errors if there is nothing to
    compare or the interval does not fit."""
    stage = base.stages[STAGE]
    weight = base.train.repa.weight if stage.repa_weight is None else stage.repa_weight
    if weight <= 0:
        raise ConfigError(f"recipe {base.name} trains stage {STAGE + 1} without REPA (weight {weight}): "
                          "nothing to compare")
    steps = steps or stage.max_steps
    eval_every = eval_every or max(1, steps // 8)
    if not 1 <= eval_every <= steps:
        raise ConfigError(f"--eval-every must be in 1..{steps}")
    return weight, steps, eval_every


def share_stage(src_run: Path, dst_run: Path, stage_dir: str) -> None:
    """Give ``dst_run`` the finished stage of ``src_run`` (final weights + EMA): the trainer then skips it and
    starts the next stage from it, exactly as in one uninterrupted run."""
    for part in ("final", "final_ema"):
        shutil.copytree(src_run / "stages" / stage_dir / part, dst_run / "stages" / stage_dir / part,
                        dirs_exist_ok=True)


def compare_repa(recipe: str, overrides: list[str], out: Path, *, steps: int | None, eval_every: int | None,
                 eval_kwargs: dict, data_dir: str | None = None, seed: int | None = None) -> dict:
    """One seed's comparison in ``out`` (steps 1-4 of the module docstring), with ``train.seed=seed`` (None: the
    recipe's own seed); returns that seed's summary, also written to ``out/compare_repa.json``."""
    out = Path(out)
    # The runs live levels down in OUT: keep the prep artefacts where the recipe's own runs find them.
    os.environ.setdefault("JANUSFLOW_CACHE", str(cache_root(load_recipe(recipe, overrides))))
    if seed is not None:
        overrides = stats.seed_overrides(overrides, seed)
    base = arm_recipe(recipe, overrides, out / "shared", STAGE + 1, [])
    weight, steps, eval_every = arm_settings(base, steps, eval_every)
    group, times, tag = f"compare-repa-{base.name}", {}, "" if seed is None else f"-seed{seed}"
    tags = {"seed": base.train.seed}
    start = time.time()
    shared = TaggedTrainer(arm_recipe(recipe, overrides, out / "shared", STAGE, []), {**tags, "arm": "shared"},
                           group=group, run_name=f"shared-stage1{tag}")
    shared.run()
    times["stage 1 (shared)"] = time.time() - start
    evaluator = StageEvaluator(STAGE, eval_kwargs, data_dir, out / "step0_eval.json")
    for name, w in zip(ARMS, (weight, 0.0)):
        start = time.time()
        r = arm_recipe(recipe, overrides, out / name, STAGE + 1, arm_extra(w, steps, eval_every))
        share_stage(out / "shared", out / name, shared.stage_dir(STAGE - 1).name)
        TaggedTrainer(r, {**tags, "arm": name}, group=group, run_name=f"{name}{tag}", evaluate=evaluator).run()
        times[name] = time.time() - start
    summary = summarize(out, base.stages[STAGE].name, times, weight, steps, eval_every, eval_kwargs)
    summary["recipe"] = base.name
    write_report(out, aggregate([summary]))
    return summary


def compare_seeds(recipe: str, overrides: list[str], out: Path, *, seeds: int, steps: int | None,
                  eval_every: int | None, eval_kwargs: dict, data_dir: str | None = None) -> dict:
    """The comparison for seeds 0 .. seeds - 1, each in ``out/seed-S``, then the report over them in ``out``
    (see the module docstring); returns the report, also written to ``out/compare_repa.json``."""
    error = stats.check_seed_free(overrides)
    if error:
        raise ConfigError(error)
    summaries = [compare_repa(recipe, overrides, stats.seed_dir(out, s), steps=steps, eval_every=eval_every,
                              eval_kwargs=eval_kwargs, data_dir=data_dir, seed=s) for s in range(seeds)]
    report = aggregate(summaries)
    write_report(Path(out), report)
    return report


def write_report(out: Path, report: dict) -> None:
    """compare_repa.json, .png and .md of a report (``aggregate``) in ``out``."""
    (out / "compare_repa.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "compare_repa.png")
    (out / "compare_repa.md").write_text(markdown(report))


# ----------------------------------------------------------------------------- one seed


def curves_of(rows: list[dict], stage: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per metric: (steps, values) of one stage, in step order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["step"]):
        for k, v in r.items():
            if k.startswith(("eval/", "loss")) and isinstance(v, (int, float)):
                out.setdefault(k, ([], []))
                out[k][0].append(r["step"])
                out[k][1].append(float(v))
    return out


def level_picks(steps: list[int], values: list[float], lower_is_better: bool) -> list[tuple[str, int, float | None]]:
    """(pick, step, level) for the points of a curve at about 1/3, 2/3 and the end of its run (``PICKS``): the
    level is the curve's value there, None where that is no better than at its first step."""
    out = []
    for name, fraction in PICKS:
        i = min(range(len(steps)), key=lambda i: abs(steps[i] - fraction * steps[-1]))
        better = values[i] != values[0] and at_least_as_good(values[i], values[0], lower_is_better)
        out.append((name, steps[i], values[i] if better else None))
    return out


def level_rows(on: dict, off: dict) -> list[dict]:
    """One seed's steps to reach REPA-off's levels (``level_picks`` of its curve) and the speed-up off ÷ on."""
    rows = []
    for key, label, lower in LEVEL_METRICS:
        if key not in on or key not in off:
            continue
        for pick, pick_step, level in level_picks(*off[key], lower):
            s_off, s_on = ((None, None) if level is None else
                           (steps_to_reach(*off[key], level, lower), steps_to_reach(*on[key], level, lower)))
            rows.append({"metric": label, "key": key, "pick": pick, "pick_step": pick_step, "level": level,
                         "lower_is_better": lower, "repa-off": s_off, "repa-on": s_on,
                         "speedup": stats.speedup(s_off, s_on)})
    return rows


def config_diff(a: dict, b: dict, prefix: str = "") -> dict[str, tuple]:
    """Flattened keys whose values differ between two nested configs: {key: (a value, b value)}."""
    out: dict[str, tuple] = {}
    keys = (set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else None
    if keys is None and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        keys, a, b = range(len(a)), dict(enumerate(a)), dict(enumerate(b))
    if keys is None:
        return {} if a == b else {prefix: (a, b)}
    for k in keys:
        out.update(config_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k)))
    return out


def summarize(out: Path, stage: str, times: dict, weight: float, steps: int, eval_every: int,
              eval_kwargs: dict) -> dict:
    """One seed's summary: the recipes' difference, its curves, levels and speed-ups, final numbers and times."""
    curves = {arm: curves_of(read_rows(out / arm / "metrics.jsonl"), stage) for arm in ARMS}
    configs = {arm: json.loads((out / arm / "recipe.json").read_text()) for arm in ARMS}
    diff = {k: v for k, v in config_diff(configs["repa-on"], configs["repa-off"]).items() if k != "run_dir"}
    return {"seed": configs["repa-on"]["train"]["seed"], "stage": stage,
            "recipe_diff": {k: list(v) for k, v in diff.items()}, "repa_weight": weight, "steps": steps,
            "eval_every": eval_every, "eval_settings": eval_kwargs, "seconds": times,
            "levels": level_rows(curves["repa-on"], curves["repa-off"]),
            "final": {arm: final_numbers(curves[arm]) for arm in ARMS},
            "curves": {arm: {k: list(map(list, v)) for k, v in c.items()} for arm, c in curves.items()}}


def final_numbers(curves: dict[str, tuple[list[int], list[float]]]) -> dict[str, float]:
    """The last evaluation, and the training losses averaged over the last 5 logged steps (one batch each)."""
    out = {k: values[-1] for k, (_, values) in curves.items() if k.startswith("eval/") and k != "eval/seconds"}
    for k in ("loss_rf", "loss_repa"):
        if k in curves:
            last = curves[k][1][-5:]
            out[f"{k} (mean of last 5 logged)"] = sum(last) / len(last)
    return out


# ----------------------------------------------------------------------------- over seeds


def aggregate(summaries: list[dict]) -> dict:
    """The report over seeds: the settings of the first seed's summary, the speed-ups and final numbers over
    seeds (``speedup_rows``, ``final_rows``), the times per seed and every seed's summary (``per_seed``)."""
    first = summaries[0]
    keep = ("recipe", "stage", "recipe_diff", "repa_weight", "steps", "eval_every", "eval_settings")
    return {**{k: first.get(k) for k in keep}, "seeds": [s["seed"] for s in summaries],
            "interval": stats.INTERVAL_NAME,
            "speedups": speedup_rows(summaries), "final": final_rows(summaries),
            "seconds": [{"seed": s["seed"], **s["seconds"]} for s in summaries], "per_seed": summaries}


def speedup_rows(summaries: list[dict]) -> list[dict]:
    """Per metric and level pick: every seed's row (``level_rows``) and the speed-up's mean ± interval over the
    seeds where both arms reached the level (None where none did)."""
    by_level: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        for row in s["levels"]:
            by_level.setdefault((row["key"], row["pick"]), []).append({**row, "seed": s["seed"]})
    out = []
    for (key, pick), rows in by_level.items():
        reached = [r["speedup"] for r in rows if r["speedup"] is not None]
        levels = [r["level"] for r in rows if r["level"] is not None]
        out.append({"metric": rows[0]["metric"], "key": key, "pick": pick,
                    "lower_is_better": rows[0]["lower_is_better"], "num_seeds": len(summaries),
                    "num_reached": len(reached), "per_seed": rows,
                    "level": as_dict(stats.estimate(levels)) if levels else None,
                    "speedup": as_dict(stats.estimate(reached)) if reached else None})
    return out


def final_rows(summaries: list[dict]) -> list[dict]:
    """Per final number: each arm's mean ± interval over seeds and the paired interval of on - off."""
    keys = list(dict.fromkeys(k for s in summaries for arm in ARMS for k in s["final"][arm]))
    out = []
    for key in keys:
        values = {arm: {s["seed"]: s["final"][arm][key] for s in summaries if key in s["final"][arm]} for arm in ARMS}
        diff = stats.paired_difference(values["repa-on"], values["repa-off"])
        out.append({"metric": key, **{arm: as_dict(stats.estimate(list(v.values()))) if v else None
                                      for arm, v in values.items()},
                    "on_minus_off": as_dict(diff) if diff else None})
    return out


def as_dict(e: Estimate) -> dict:
    return dataclasses.asdict(e)


def of_dict(d: dict | None) -> Estimate | None:
    return None if d is None else Estimate(**d)


# ----------------------------------------------------------------------------- figure


def plot(report: dict, path: Path) -> None:
    """Per panel, each arm's mean curve over seeds with its band (one seed: its curve), seeds as thin lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    colors = {"repa-on": "tab:blue", "repa-off": "tab:orange"}
    for ax, (key, title) in zip(axes.flat, PANELS):
        for arm in ARMS:
            runs = [tuple(s["curves"][arm][key]) for s in report["per_seed"] if key in s["curves"][arm]]
            if not runs:
                continue
            if key.startswith("eval/"):
                draw_band(ax, runs, colors[arm], arm, "o-")
                continue
            # one noisy batch per point: show a running mean over the logged steps
            if len(runs) == 1:
                ax.plot(*runs[0], color=colors[arm], alpha=0.25, lw=0.8)
            smooth = [(steps, running_mean(values, 5)) for steps, values in runs]
            draw_band(ax, smooth, colors[arm], f"{arm} (running mean of 5)", "-")
        ax.set_title(title)
        ax.set_xlabel(f"{report['stage']} step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    n = len(report["seeds"])
    seeds = ("1 seed (no band)" if n == 1 else
             f"mean of {n} seeds, band: mean ± {stats.INTERVAL_NAME}, thin lines: each seed")
    fig.suptitle(f"REPA on vs off: recipe {report['recipe']}, stage {report['stage']}, same start, data and seeds "
                 f"per seed; {seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_band(ax, runs: list[tuple[list, list]], color: str, label: str, style: str) -> None:
    """The mean of the runs' curves with its t-interval band and each run thin; one run: just its curve."""
    steps, means, half = stats.curve_band(runs)
    if half is None:
        ax.plot(steps, means, style, color=color, label=label)
        return
    for run_steps, values in runs:
        ax.plot(run_steps, values, color=color, alpha=0.3, lw=0.7)
    ax.plot(steps, means, style, color=color, label=f"{label}: mean ± 95% t-CI, {len(runs)} seeds")
    ax.fill_between(steps, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)],
                    color=color, alpha=0.2, lw=0)


def running_mean(values: list[float], n: int) -> list[float]:
    return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


# ----------------------------------------------------------------------------- table


def markdown(report: dict) -> str:
    """The report as markdown: settings, the headline speed-ups, the speed-up table, final numbers and times."""
    r, k = report, report["eval_settings"]
    n = len(r["seeds"])
    diff = ", ".join(f"`{key}`: {a} (on) vs {b} (off)" for key, (a, b) in r["recipe_diff"].items())
    seeds = f"{n} seed{'s' if n > 1 else ''} (train.seed {', '.join(map(str, r['seeds']))})"
    lines = [
        f"# REPA on vs off: recipe `{r['recipe']}`, stage `{r['stage']}`, {r['steps']} steps, {seeds}",
        "",
        f"Per seed, both arms start from the same stage-1 checkpoint (trained with that seed) with the same data "
        f"order, noise, t and seeds; their recipes differ only in {diff}. Every {r['eval_every']} steps the EMA "
        f"model is evaluated: shapes-GenEval ({k['num_geneval_per_category']} prompts per category), FD of "
        f"{k['num_fd_images']} generated vs held-out images in the SigLIP feature space, VQA on {k['num_vqa']} "
        f"held-out questions (greedy), RF validation loss on {k['num_rf_images']} held-out images at fixed t and "
        f"noise; Euler {k['steps']} steps, CFG {k['cfg_weight']}, evaluation seed {k['seed']} (the same for every "
        f"training seed).",
        "",
        f"`a ± b`: the mean over seeds ± the half-width of its {stats.INTERVAL_NAME} (t(0.975, n - 1) · sd / √n, "
        f"sample sd); `{stats.NO_INTERVAL}`: a single seed gives no interval.",
        "",
    ]
    lines += headline(r) + speedup_table(r) + final_table(r) + times_table(r)
    return "\n".join(lines)


def headline(report: dict) -> list[str]:
    """The speed-ups to equal REPA-off's final FD and shapes-GenEval overall."""
    lines = ["## REPA speed-up: steps REPA-off needs ÷ steps REPA-on needs to equal REPA-off's final value", ""]
    for row in report["speedups"]:
        if row["key"] in HEADLINE and row["pick"] == "end":
            reached = f"{row['num_reached']} of {row['num_seeds']} seeds reached it with both arms"
            value = "-" if row["speedup"] is None else f"**{of_dict(row['speedup']).format(2, suffix='x')}**"
            lines.append(f"- {row['metric']}: {value} ({reached}; per seed below)")
    if len(lines) == 2:
        lines.append("- (no FD or shapes-GenEval curves)")
    return [*lines, ""]


def speedup_table(report: dict) -> list[str]:
    lines = ["## Steps to reach the levels REPA-off reaches (at about 1/3, 2/3 and the end of its run)", "",
             "| metric | level: REPA-off at | level, mean over seeds | seeds where both arms reached it "
             "| speed-up (off ÷ on) | per seed: steps off → on (speed-up) |", "|---|---|---|---|---|---|"]
    for row in report["speedups"]:
        sign = "<=" if row["lower_is_better"] else ">="
        level = "-" if row["level"] is None else f"{sign} {of_dict(row['level']).format(4)}"
        speed = "-" if row["speedup"] is None else of_dict(row["speedup"]).format(2, suffix="x")
        per_seed = "; ".join(seed_cell(s, report["steps"]) for s in row["per_seed"])
        lines.append(f"| {row['metric']} | {row['pick']} | {level} | {row['num_reached']} / {row['num_seeds']} "
                     f"| {speed} | {per_seed} |")
    if not report["speedups"]:
        lines.append("| (no evaluation curves) | | | | | |")
    return [*lines, "", "A seed with `no level`: REPA-off was no better there than at step 0 (nothing to reach). "
            "`never`: the arm did not reach the level within the run; its speed-up is then below the bound given.",
            ""]


def seed_cell(row: dict, steps: int) -> str:
    """One seed's steps to reach a level: ``s0: 300 → 150 (2.00x)``, or why there is no speed-up."""
    off, on = row["repa-off"], row["repa-on"]
    if row["level"] is None:
        return f"s{row['seed']}: no level"
    if off is None:
        return f"s{row['seed']}: REPA-off never"
    if on is None:
        return f"s{row['seed']}: {off} → never in {steps} (< {off / steps:.2f}x)"
    speed = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
    return f"s{row['seed']}: {off} → {on} ({speed})"


def final_table(report: dict) -> list[str]:
    lines = [f"## Final numbers (step {report['steps']})", "",
             "| metric | REPA on | REPA off | on − off (paired over seeds) | told apart? |", "|---|---|---|---|---|"]
    for row in report["final"]:
        on, off, diff = (of_dict(row[k]) for k in ("repa-on", "repa-off", "on_minus_off"))
        cells = [fmt(on), fmt(off), "-" if diff is None else diff.format(4, sign=True),
                 stats.told_apart(diff, "on higher", "on lower")]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
    return [*lines, "", "told apart: whether the paired interval of the per-seed differences excludes 0.", ""]


def times_table(report: dict) -> list[str]:
    parts = list(dict.fromkeys(p for row in report["seconds"] for p in row if p != "seed"))
    lines = ["## Time (the invocation that finished each seed, seconds, training + evaluation)", "",
             "| seed | " + " | ".join(parts) + " | total |", "|---" * (len(parts) + 2) + "|"]
    for row in report["seconds"]:
        values = [row.get(p, 0.0) for p in parts]
        lines.append(f"| {row['seed']} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {sum(values):.0f} |")
    return [*lines, "| total | " + "| " * len(parts) + f"{total_seconds(report):.0f} |", ""]


def total_seconds(report: dict) -> float:
    return sum(v for row in report["seconds"] for p, v in row.items() if p != "seed")


def fmt(value: Estimate | None) -> str:
    return "-" if value is None else value.format(4)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="2to8", help="recipe name (recipes/NAME.yaml) or a YAML path")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0 .. N-1 (train.seed=S), each a full "
                                                       "comparison in OUT/seed-S (default 3; --seed: the evaluation's)")
    p.add_argument("--steps", type=int, help="stage-2 steps of each arm (default: the recipe's)")
    p.add_argument("--eval-every", type=int, help="evaluate the EMA model every N stage-2 steps (default: steps / 8)")
    p.add_argument("--out", help="output directory (default: runs/compare-repa-RECIPE)")
    p.add_argument("--data", help="held-out shapes data (default: the recipe's shapes dataset)")
    add_eval_args(p, **COMPARISON_DEFAULTS)
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. train.repa.weight=0.5 (not "
                                                "train.seed: --seeds sets it)")
    args = p.parse_args(argv)
    check_eval_args(p, args, positive=("eval_every", "seeds"))
    if error := stats.check_seed_free(args.overrides):
        p.error(error)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eval_kwargs = eval_kwargs_of(args)
    out = Path(args.out or f"runs/compare-repa-{Path(args.recipe).stem}")
    try:
        report = compare_seeds(args.recipe, args.overrides, out, seeds=args.seeds, steps=args.steps,
                               eval_every=args.eval_every, eval_kwargs=eval_kwargs, data_dir=args.data)
    except ConfigError as e:
        print(f"compare_repa.py: error: {e}", file=sys.stderr)
        return 2
    print((out / "compare_repa.md").read_text())
    print(f"wrote {out / 'compare_repa.png'}, {out / 'compare_repa.md'}, {out / 'compare_repa.json'} (and each "
          f"seed's in {stats.seed_dir(out, 'S')}); total {total_seconds(report):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
