"""REPA on vs off: the recipe's stage 2 trained twice from one stage-1 checkpoint, evaluated as it trains.

    python tools/compare_repa.py --recipe 2to8 [--steps N] [--eval-every N] [--out DIR] [key=value ...]
    make compare-repa RECIPE=2to8

1. Stage 1 (adaptation) of the recipe runs once, in ``OUT/shared``.
2. Stage 2 runs twice from that same stage-1 checkpoint, in ``OUT/repa-on`` (the recipe's REPA weight) and
   ``OUT/repa-off`` (weight 0). Everything else (data order, noise, t, CFG dropout, seeds) is the same, so the
   two ``recipe.json`` files differ only in ``stages.1.repa_weight`` (and ``run_dir``).
3. Every ``--eval-every`` steps and at the end, the EMA model is evaluated (janusflow.eval.runner: shapes-GenEval,
   FD in SigLIP space, SigLIP image-text score, VQA accuracy, RF validation loss) and logged as ``eval/*`` to
   metrics.jsonl and wandb (offline unless WANDB_MODE says otherwise; one group, runs ``repa-on`` / ``repa-off``,
   curves overlay).
4. ``OUT/compare_repa.png`` plots the curves; ``OUT/compare_repa.md`` tabulates the steps each arm needs to
   reach the levels REPA-off reaches, the speed-up, the final numbers and the time taken.

Run it again to continue an interrupted comparison (every run resumes from its checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from janusflow.config import ConfigError, Recipe, load_recipe
from janusflow.eval.cli import COMPARISON_DEFAULTS, add_eval_args, check_eval_args
from janusflow.eval.cli import eval_kwargs as eval_kwargs_of
from janusflow.eval.runner import evaluate_model, load_eval_data
from janusflow.eval.siglip_score import SigLIPJudge
from janusflow.io import read_jsonl_records as read_rows
from janusflow.train.prep import cache_root
from janusflow.train.trainer import Trainer

STAGE = 1  # the compared stage: unified pre-training
ARMS = ("repa-on", "repa-off")
# (metric key, label, lower is better) of the eval rows that get levels and speed-ups
LEVEL_METRICS = (("eval/fd", "FD (SigLIP space)", True), ("eval/geneval/overall", "shapes-GenEval overall", False),
                 ("eval/siglip_score", "SigLIP image-text score", False), ("eval/rf_val", "RF validation loss", True))
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


# ----------------------------------------------------------------------------- runs


def arm_recipe(recipe: str, overrides: list[str], run_dir: Path, num_stages: int, extra: list[str]) -> Recipe:
    """The recipe with its first ``num_stages`` stages, in ``run_dir``; ``extra`` overrides win."""
    r = load_recipe(recipe, [*overrides, f"run_dir={run_dir}", *extra])
    if len(r.stages) < STAGE + 1:
        raise ConfigError(f"recipe {recipe} has {len(r.stages)} stage(s); the comparison needs stages 1 and 2")
    r.stages = r.stages[:num_stages]
    return r


def share_stage(src_run: Path, dst_run: Path, stage_dir: str) -> None:
    """Give ``dst_run`` the finished stage of ``src_run`` (final weights + EMA): the trainer then skips it and
    starts the next stage from it, exactly as in one uninterrupted run."""
    for part in ("final", "final_ema"):
        shutil.copytree(src_run / "stages" / stage_dir / part, dst_run / "stages" / stage_dir / part,
                        dirs_exist_ok=True)


def compare_repa(recipe: str, overrides: list[str], out: Path, *, steps: int | None, eval_every: int | None,
                 eval_kwargs: dict, data_dir: str | None = None) -> dict:
    """Run the comparison (see the module docstring); returns the summary also written to compare_repa.json."""
    out = Path(out)
    # The runs live one level down in OUT: keep the prep artefacts where the recipe's own runs find them.
    os.environ.setdefault("JANUSFLOW_CACHE", str(cache_root(load_recipe(recipe, overrides))))
    base = arm_recipe(recipe, overrides, out / "shared", STAGE + 1, [])
    stage = base.stages[STAGE]
    weight = base.train.repa.weight if stage.repa_weight is None else stage.repa_weight
    if weight <= 0:
        raise ConfigError(f"recipe {recipe} trains stage {STAGE + 1} without REPA (weight {weight}): "
                          "nothing to compare")
    steps = steps or stage.max_steps
    eval_every = eval_every or max(1, steps // 8)
    if not 1 <= eval_every <= steps:
        raise ConfigError(f"--eval-every must be in 1..{steps}")
    group, times = f"compare-repa-{base.name}", {}
    start = time.time()
    shared = Trainer(arm_recipe(recipe, overrides, out / "shared", STAGE, []), group=group, run_name="shared-stage1")
    shared.run()
    times["stage 1 (shared)"] = time.time() - start
    evaluator = StageEvaluator(STAGE, eval_kwargs, data_dir, out / "step0_eval.json")
    for name, w in zip(ARMS, (weight, 0.0)):
        start = time.time()
        r = arm_recipe(recipe, overrides, out / name, STAGE + 1, [f"stages.{STAGE}.repa_weight={w}",
                                                                   f"stages.{STAGE}.max_steps={steps}",
                                                                   f"logging.sample_every={eval_every}"])
        share_stage(out / "shared", out / name, shared.stage_dir(STAGE - 1).name)
        Trainer(r, group=group, run_name=name, evaluate=evaluator).run()
        times[name] = time.time() - start
    summary = summarize(out, stage.name, times, weight, steps, eval_every, eval_kwargs)
    (out / "compare_repa.json").write_text(json.dumps(summary, indent=2))
    plot(summary["curves"], out / "compare_repa.png", base.name, stage.name)
    (out / "compare_repa.md").write_text(markdown(summary, base.name, stage.name))
    return summary


# ----------------------------------------------------------------------------- analysis


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


def at_least_as_good(value: float, level: float, lower_is_better: bool) -> bool:
    return value <= level if lower_is_better else value >= level


def steps_to_reach(steps: list[int], values: list[float], level: float, lower_is_better: bool) -> int | None:
    """The first step whose value is at least as good as ``level`` (None: never)."""
    return next((s for s, v in zip(steps, values) if at_least_as_good(v, level, lower_is_better)), None)


def levels(steps: list[int], values: list[float], lower_is_better: bool) -> list[float]:
    """The values a curve has at about 1/3, 2/3 and the end of its run, where better than at its first step;
    easiest level first."""
    picks = {min(range(len(steps)), key=lambda i: abs(steps[i] - f * steps[-1])) for f in (1 / 3, 2 / 3, 1)}
    better = {values[i] for i in picks if values[i] != values[0] and at_least_as_good(values[i], values[0],
                                                                                        lower_is_better)}
    return sorted(better, reverse=lower_is_better)


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
    curves = {arm: curves_of(read_rows(out / arm / "metrics.jsonl"), stage) for arm in ARMS}
    on, off = curves["repa-on"], curves["repa-off"]
    table = []
    for key, label, lower in LEVEL_METRICS:
        if key not in on or key not in off:
            continue
        for level in levels(*off[key], lower):
            s_off, s_on = steps_to_reach(*off[key], level, lower), steps_to_reach(*on[key], level, lower)
            table.append({"metric": label, "key": key, "level": level, "lower_is_better": lower,
                          "repa-off": s_off, "repa-on": s_on,
                          "speedup": s_off / s_on if s_off and s_on else None})
    configs = {arm: json.loads((out / arm / "recipe.json").read_text()) for arm in ARMS}
    diff = {k: v for k, v in config_diff(configs["repa-on"], configs["repa-off"]).items() if k != "run_dir"}
    final = {arm: final_numbers(curves[arm]) for arm in ARMS}
    return {"recipe_diff": {k: list(v) for k, v in diff.items()}, "repa_weight": weight, "steps": steps,
            "eval_every": eval_every, "eval_settings": eval_kwargs, "seconds": times, "levels": table,
            "final": final, "curves": {arm: {k: list(map(list, v)) for k, v in c.items()} for arm, c in curves.items()}}


def final_numbers(curves: dict[str, tuple[list[int], list[float]]]) -> dict[str, float]:
    """The last evaluation, and the training losses averaged over the last 5 logged steps (one batch each)."""
    out = {k: values[-1] for k, (_, values) in curves.items() if k.startswith("eval/") and k != "eval/seconds"}
    for k in ("loss_rf", "loss_repa"):
        if k in curves:
            last = curves[k][1][-5:]
            out[f"{k} (mean of last 5 logged)"] = sum(last) / len(last)
    return out


def plot(curves: dict, path: Path, recipe: str, stage: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    colors = {"repa-on": "tab:blue", "repa-off": "tab:orange"}
    for ax, (key, title) in zip(axes.flat, PANELS):
        for arm in ARMS:
            if key not in curves[arm]:
                continue
            steps, values = curves[arm][key]
            if key.startswith("eval/"):
                ax.plot(steps, values, "o-", color=colors[arm], label=arm)
            else:  # one noisy batch per point: show a running mean over the logged steps too
                ax.plot(steps, values, color=colors[arm], alpha=0.25, lw=0.8)
                ax.plot(steps, running_mean(values, 5), color=colors[arm], label=f"{arm} (running mean of 5)")
        ax.set_title(title)
        ax.set_xlabel(f"{stage} step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    fig.suptitle(f"REPA on vs off: recipe {recipe}, stage {stage}, same start, data and seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def running_mean(values: list[float], n: int) -> list[float]:
    return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


def markdown(summary: dict, recipe: str, stage: str) -> str:
    s, k = summary, summary["eval_settings"]
    diff = ", ".join(f"`{key}`: {a} (on) vs {b} (off)" for key, (a, b) in s["recipe_diff"].items())
    lines = [
        f"# REPA on vs off: recipe `{recipe}`, stage `{stage}`, {s['steps']} steps",
        "",
        f"Both arms start from the same stage-1 checkpoint with the same data order, noise, t and seeds; their "
        f"recipes differ only in {diff}. Every {s['eval_every']} steps the EMA model is evaluated: "
        f"shapes-GenEval ({k['num_geneval_per_category']} prompts per category), FD of {k['num_fd_images']} "
        f"generated vs held-out images in the SigLIP feature space, VQA on {k['num_vqa']} held-out questions "
        f"(greedy), RF validation loss on {k['num_rf_images']} held-out images at fixed t and noise; "
        f"Euler {k['steps']} steps, CFG {k['cfg_weight']}, seed {k['seed']}.",
        "",
        "## Steps to reach the levels REPA-off reaches (at about 1/3, 2/3 and the end of its run)",
        "",
        "| metric | level | REPA off: steps | REPA on: steps | speed-up (off / on) |",
        "|---|---|---|---|---|",
    ]
    for row in s["levels"]:
        sign = "<=" if row["lower_is_better"] else ">="
        on = row["repa-on"] if row["repa-on"] is not None else f"not reached in {s['steps']}"
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        lines.append(f"| {row['metric']} | {sign} {row['level']:.4f} | {row['repa-off']} | {on} | {speed} |")
    if not s["levels"]:
        lines.append("| (REPA-off never improved on its step-0 value) | | | | |")
    lines += ["", f"## Final numbers (step {s['steps']})", "", "| metric | REPA on | REPA off |", "|---|---|---|"]
    keys = list(s["final"]["repa-on"]) + [key for key in s["final"]["repa-off"] if key not in s["final"]["repa-on"]]
    for key in keys:
        a, b = (s["final"][arm].get(key) for arm in ARMS)
        lines.append(f"| {key} | {fmt(a)} | {fmt(b)} |")
    lines += ["", "## Time (this invocation, seconds, training + evaluation)", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {part} | {sec:.0f} |" for part, sec in s["seconds"].items()]
    lines += [f"| total | {sum(s['seconds'].values()):.0f} |", ""]
    return "\n".join(lines)


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="2to8", help="recipe name (recipes/NAME.yaml) or a YAML path")
    p.add_argument("--steps", type=int, help="stage-2 steps of each arm (default: the recipe's)")
    p.add_argument("--eval-every", type=int, help="evaluate the EMA model every N stage-2 steps (default: steps / 8)")
    p.add_argument("--out", help="output directory (default: runs/compare-repa-RECIPE)")
    p.add_argument("--data", help="held-out shapes data (default: the recipe's shapes dataset)")
    add_eval_args(p, **COMPARISON_DEFAULTS)
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. train.repa.weight=0.5")
    args = p.parse_args(argv)
    check_eval_args(p, args, positive=("eval_every",))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eval_kwargs = eval_kwargs_of(args)
    out = Path(args.out or f"runs/compare-repa-{Path(args.recipe).stem}")
    try:
        summary = compare_repa(args.recipe, args.overrides, out, steps=args.steps, eval_every=args.eval_every,
                               eval_kwargs=eval_kwargs, data_dir=args.data)
    except ConfigError as e:
        print(f"compare_repa.py: error: {e}", file=sys.stderr)
        return 2
    print((out / "compare_repa.md").read_text())
    print(f"wrote {out / 'compare_repa.png'}, {out / 'compare_repa.md'}, {out / 'compare_repa.json'}; "
          f"total {sum(summary['seconds'].values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
