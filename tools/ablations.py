"""The paper's ablations A-F (JanusFlow Table 6) at toy scale: train every arm on several seeds, evaluate it,
tabulate the mean ± 95% t-interval over seeds and plot.

    python tools/ablations.py [--arms abcdef] [--seeds 3] [--out runs/ablations] [--max-steps N] [eval options]
                              [key=value ...]
    make ablations                              # all six arms x 3 seeds, then runs/ablations/results.{md,png}
    make ablations ARGS="--seeds 1 --max-steps 5 --num-fd-images 16"   # a quick check, in runs/ablations-max5

    arm  REPA  understanding encoder         generation encoder  trained on
    A    no    SigLIP                        VAE + ConvNeXt      und + gen
    B    yes   VAE + ConvNeXt (shared)       VAE + ConvNeXt      und + gen
    C    yes   VAE + ConvNeXt (separate)     VAE + ConvNeXt      und + gen
    D    -     SigLIP                        -                   und only
    E    yes   -                             VAE + ConvNeXt      gen only
    F    yes   SigLIP                        VAE + ConvNeXt      und + gen  (JanusFlow)

Arm X is ``recipes/ablation-x.yaml`` (A-E inherit F and change only their ablation: same prep caches, data, seeds
and steps), trained once per seed S in 0 .. --seeds - 1 (default 3: every arm costs 3 trainings) with
``train.seed=S``, in ``OUT/x/seed-S`` (resumable: finished runs are skipped, an interrupted one continues from its
checkpoint; a larger ``--seeds`` adds seeds). All arms of a seed train before the next seed starts, so an
interrupted invocation leaves whole seeds behind. Each run's exported EMA model is then evaluated once
(janusflow.eval.runner, kept in ``OUT/x/seed-S/eval.json`` and reused while the settings match: changing only the
evaluation options re-evaluates without retraining): VQA accuracy on held-out questions, FD in SigLIP space,
shapes-GenEval, the SigLIP image-text score and the RF validation loss, with the same prompts and sampler noise for
every arm and seed (``--seed``). More prompts and images narrow the evaluation's own noise: ``--num-geneval``,
``--num-fd-images``, ``--num-vqa``, ``--num-rf-images``. A metric of a task the arm never trained on is n/a
(D: generation, E: understanding).

``OUT/results.md``: per arm and metric the mean over seeds ± the half-width of its 95% Student-t interval
(``t(0.975, n - 1) * sd / sqrt(n)``; "n/a (1 seed)" with ``--seeds 1``), the best mean in bold; and "told apart?"
for F vs A (REPA) and F vs B (SigLIP vs the shared VAE understanding encoder): per metric, the paired 95%
t-interval of the per-seed differences F - X over the seeds both ran (the arms share seeds: same data order and
noise per seed) and whether it excludes 0. ``OUT/results.png``: a bar chart per metric (mean, the interval as the
error bar, a dot per seed). ``OUT/results.json``: every (arm, seed) record. Statistics: janusflow.eval.seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from janusflow.config import ConfigError, Recipe, load_recipe
from janusflow.eval import seeds as stats
from janusflow.eval.cli import COMPARISON_DEFAULTS, add_eval_args, check_eval_args
from janusflow.eval.cli import eval_kwargs as eval_kwargs_of
from janusflow.eval.seeds import Estimate

ARMS = "abcdef"
# (result key, column label, lower is better)
METRICS = (("vqa_acc", "VQA acc", False), ("fd", "FD", True), ("geneval/overall", "shapes-GenEval", False),
           ("siglip_score", "SigLIP score", False), ("rf_val", "RF val loss", True))
UND_ENCODERS = {"siglip": "SigLIP", "shared_gen": "VAE + ConvNeXt (shared)",
                "separate_gen": "VAE + ConvNeXt (separate)"}
# The pairs of arms the "told apart?" section compares: F vs A (REPA), F vs B (understanding encoder).
TOLD_APART = (("f", "a"), ("f", "b"))


# ----------------------------------------------------------------------------- arms


def arm_recipe(arm: str, overrides: list[str], out: Path, max_steps: int | None = None,
               seed: int | None = None) -> Recipe:
    """recipes/ablation-<arm>.yaml in OUT/<arm>/seed-S with ``train.seed=S`` (``seed`` None: in OUT/<arm>, with
    the recipe's seed); ``max_steps`` caps every stage (a quick check of the pipeline)."""
    run_dir = Path(out) / arm if seed is None else stats.seed_dir(Path(out) / arm, seed)
    overrides = overrides if seed is None else stats.seed_overrides(overrides, seed)
    recipe = load_recipe(f"ablation-{arm}", [*overrides, f"run_dir={run_dir}"])
    if max_steps is not None:
        for stage in recipe.stages:
            stage.max_steps = min(stage.max_steps, max_steps)
    return recipe


def seed_recipes(arms: str, overrides: list[str], out: Path, seeds: int,
                 max_steps: int | None = None) -> dict[tuple[str, int], Recipe]:
    """The runs of ``--arms`` x ``--seeds``, keyed (arm, seed), in the order they train: every arm of seed 0
    (in A-F order), then of seed 1, ..."""
    return {(a, s): arm_recipe(a, overrides, out, max_steps, seed=s) for s in range(seeds) for a in ARMS if a in arms}


def trained_tasks(recipe: Recipe) -> tuple[str, ...]:
    """The tasks ("gen", "und") some stage of the recipe trains on: the ones worth evaluating."""
    phases = [p for s in recipe.stages for p in s.mixture]
    return tuple(t for t in ("gen", "und") if any(getattr(p, t) > 0 for p in phases))


def arm_setup(recipe: Recipe) -> dict:
    """The columns of the paper's table that describe an arm."""
    tasks = trained_tasks(recipe)
    repa = any((recipe.train.repa.weight if s.repa_weight is None else s.repa_weight) > 0 for s in recipe.stages)
    return {"repa": repa if "gen" in tasks else None,
            "und_encoder": UND_ENCODERS[recipe.model.und_encoder_kind] if "und" in tasks else None,
            "gen_encoder": "VAE + ConvNeXt" if "gen" in tasks else None,
            "trained_on": " + ".join(tasks[::-1]) if len(tasks) == 2 else f"{tasks[0]} only",
            "tasks": list(tasks), "steps": [s.max_steps for s in recipe.stages]}


def run_arm(arm: str, recipe: Recipe, prep: dict, eval_kwargs: dict, settings: dict, log=print) -> dict:
    """Train (or resume) one arm on one seed (the recipe's train.seed) and evaluate its export; the record is
    cached in its run directory's eval.json."""
    from janusflow.eval.runner import evaluate_export
    from janusflow.train.trainer import Trainer

    run_dir, seed = recipe.resolved_run_dir, recipe.train.seed
    cached = run_dir / "eval.json"
    if cached.exists():
        record = json.loads(cached.read_text())
        if record["settings"] == settings and record.get("seed") == seed:
            log(f"ablation {arm.upper()} seed {seed}: done already ({cached})")
            return record
    setup = arm_setup(recipe)
    start = time.time()
    Trainer(recipe, group="ablations", run_name=f"ablation-{arm}-seed{seed}").run()
    train_s = time.time() - start
    log(f"ablation {arm.upper()} seed {seed}: trained in {train_s:.0f} s, evaluating {'+'.join(setup['tasks'])}")
    start = time.time()
    results = evaluate_export(run_dir / "export", prep["data_dir"], siglip_dir=prep["siglip_dir"],
                              tasks=tuple(setup["tasks"]), **eval_kwargs)
    record = {"arm": arm, "seed": seed, "setup": setup, "settings": settings, "results": results,
              "seconds": {"train": train_s, "eval": time.time() - start}}
    cached.write_text(json.dumps(record, indent=2))
    return record


# ----------------------------------------------------------------------------- statistics over seeds


def per_seed_values(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """arm -> metric -> {seed: value}, arms in record order; a metric an arm never has is left out."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        metrics = out.setdefault(r["arm"], {})
        for key, _, _ in METRICS:
            if key in r["results"]:
                metrics.setdefault(key, {})[r["seed"]] = r["results"][key]
    return out


def arm_estimates(records: list[dict]) -> dict[str, dict[str, Estimate]]:
    """arm -> metric -> mean and t-interval over the arm's seeds."""
    return {arm: {key: stats.estimate(list(v.values())) for key, v in metrics.items()}
            for arm, metrics in per_seed_values(records).items()}


def best_means(estimates: dict[str, dict[str, Estimate]]) -> dict[str, float]:
    """The best mean of each metric over the arms that have it (none where they all tie)."""
    best = {}
    for key, _, lower in METRICS:
        means = [m[key].mean for m in estimates.values() if key in m]
        if len(set(means)) > 1:
            best[key] = min(means) if lower else max(means)
    return best


# ----------------------------------------------------------------------------- table and figure


def markdown(records: list[dict], eval_kwargs: dict, real_siglip_score: float | None = None) -> str:
    """The results table (mean ± interval over seeds, best mean of each column in bold, n/a where the arm never
    trained the task), the "told apart?" section; ``real_siglip_score``: the score of the held-out real images with
    their captions, for scale."""
    estimates = arm_estimates(records)
    best = best_means(estimates)
    setups = {r["arm"]: r["setup"] for r in records}
    seeds = sorted({r["seed"] for r in records})
    head = ["arm", "REPA", "und. encoder", "gen. encoder", "trained on", "seeds",
            *(f"{label} {'↓' if lower else '↑'}" for _, label, lower in METRICS)]
    lines = ["# JanusFlow ablations (paper Table 6) at toy scale", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, s in setups.items():
        repa = "-" if s["repa"] is None else ("yes" if s["repa"] else "no")
        name = arm.upper() + (" (JanusFlow)" if arm == "f" else "")
        num = len({r["seed"] for r in records if r["arm"] == arm})
        cells = [name, repa, s["und_encoder"] or "-", s["gen_encoder"] or "-", s["trained_on"], str(num)]
        for key, _, _ in METRICS:
            e = estimates[arm].get(key)
            cells.append("n/a" if e is None else (f"**{e.format(4)}**" if e.mean == best.get(key) else e.format(4)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", notes(records, eval_kwargs, seeds)]
    if real_siglip_score is not None:
        lines += ["", f"For scale: the held-out real images with their own captions have a SigLIP score of "
                      f"{real_siglip_score:.4f}."]
    return "\n".join([*lines, "", *told_apart(records), *seconds_table(records)])


def notes(records: list[dict], eval_kwargs: dict, seeds: list[int]) -> str:
    """The paragraph under the table: seeds, steps, data matching and the evaluation settings."""
    first = {r["arm"]: r for r in records}
    steps = ", ".join(f"{a.upper()} {' + '.join(map(str, r['setup']['steps']))}" for a, r in first.items())
    return (f"Seeds: train.seed {', '.join(map(str, seeds))}; each cell is the mean over the arm's seeds ± the "
            f"half-width of its {stats.INTERVAL_NAME} (t(0.975, n - 1) · sd / √n, sample sd; {stats.NO_INTERVAL}: "
            f"a single seed gives no interval). Steps per stage (adaptation + unified pre-training): {steps}; batch "
            f"as in recipes/ablation-f.yaml. D and E are data-matched as in the paper: fewer steps, so that each "
            f"sees F's amount of its own task's data (not more), and their columns compare single-task training "
            f"with F at equal data of that task. VQA: exact match on {eval_kwargs['num_vqa']} held-out questions. "
            f"FD: {eval_kwargs['num_fd_images']} generated vs held-out images in the prep SigLIP's feature space. "
            f"shapes-GenEval: {eval_kwargs['num_geneval_per_category']} prompts per category. SigLIP score: mean "
            f"SigLIP match probability of each FD image with its prompt (the prep's SigLIP, both towers). Sampler: "
            f"Euler, {eval_kwargs['steps']} steps, CFG {eval_kwargs['cfg_weight']}, evaluation seed "
            f"{eval_kwargs['seed']} (the same for every arm and training seed). n/a: the arm never trained that "
            f"task.")


def told_apart(records: list[dict]) -> list[str]:
    """F vs A and F vs B per metric: the paired interval of F - X over shared seeds, and whether it excludes 0."""
    values = per_seed_values(records)
    pairs = [(a, b) for a, b in TOLD_APART if a in values and b in values]
    if not pairs:
        return []
    lines = ["## Told apart? F vs A (REPA) and F vs B (understanding encoder)", "",
             "| comparison | metric | F − X, paired over seeds | seeds | told apart? |", "|---|---|---|---|---|"]
    for a, b in pairs:
        for key, label, lower in METRICS:
            diff = stats.paired_difference(values[a].get(key, {}), values[b].get(key, {}))
            cell, num = ("n/a", 0) if diff is None else (diff.format(4, sign=True), diff.n)
            lines.append(f"| {a.upper()} vs {b.upper()} | {label} {'↓' if lower else '↑'} | {cell} | {num} "
                         f"| {told_apart_verdict(diff, lower, a, b)} |")
    return [*lines, "", "Paired: the 95% t-interval (n - 1 degrees of freedom) of the per-seed differences over the "
            "seeds both arms ran; the arms share their seeds (same data order and noise per seed), so pairing "
            "removes the seed's own effect. Told apart where the interval excludes 0.", ""]


def told_apart_verdict(diff: Estimate | None, lower_is_better: bool, a: str, b: str) -> str:
    """The verdict on the difference a - b, naming the better arm."""
    higher, lower = (b, a) if lower_is_better else (a, b)
    return stats.told_apart(diff, f"{higher.upper()} better", f"{lower.upper()} better")


def seconds_table(records: list[dict]) -> list[str]:
    lines = ["Seconds (of the invocations that finished each run, summed over the arm's seeds):", "",
             "| arm | seeds | train s | eval s |", "|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in records):
        mine = [r for r in records if r["arm"] == arm]
        train, evals = (sum(r["seconds"][k] for r in mine) for k in ("train", "eval"))
        lines.append(f"| {arm.upper()} | {len(mine)} | {train:.0f} | {evals:.0f} |")
    total = sum(r["seconds"]["train"] + r["seconds"]["eval"] for r in records)
    return [*lines, f"| total | {len(records)} | {total:.0f} | |", ""]


def plot(records: list[dict], path: Path) -> None:
    """One bar chart per metric: the mean over seeds (F highlighted), its t-interval as the error bar, a dot per
    seed; n/a written where an arm has no value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimates, values = arm_estimates(records), per_seed_values(records)
    arms, shown = list(estimates), METRICS[:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8))
    for ax, (key, label, lower) in zip(axes, shown):
        ests = [estimates[a].get(key) for a in arms]
        means = [0.0 if e is None else e.mean for e in ests]
        errs = [0.0 if e is None or e.half_width is None else e.half_width for e in ests]
        ax.bar([a.upper() for a in arms], means, yerr=errs, capsize=4,
               color=["tab:red" if a == "f" else "tab:gray" for a in arms])
        for i, a in enumerate(arms):
            seed_values = list(values[a].get(key, {}).values())
            ax.scatter([i] * len(seed_values), seed_values, s=10, color="black", zorder=3)
        top = max([m + e for m, e in zip(means, errs)] + [v for m in values.values() for v in m.get(key, {}).values()],
                  default=1.0) or 1.0
        for i, e in enumerate(ests):
            ax.text(i, (0.0 if e is None else e.mean + errs[i]) + 0.01 * top, "n/a" if e is None else f"{e.mean:.3g}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{label} ({'lower' if lower else 'higher'} is better)")
        ax.set_ylim(0, top * 1.15)
        ax.grid(axis="y", alpha=0.3)
    n = len({r["seed"] for r in records})
    spread = "1 seed" if n == 1 else f"bars: mean of {n} seeds, error bars: {stats.INTERVAL_NAME}, dots: seeds"
    fig.suptitle(f"JanusFlow ablations at toy scale (F = JanusFlow: SigLIP + REPA, decoupled encoders); {spread}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def real_siglip_score(prep: dict, n: int) -> float:
    from janusflow.eval.runner import load_eval_data
    from janusflow.eval.siglip_score import SigLIPJudge

    data = load_eval_data(prep["data_dir"], n, 1)
    return SigLIPJudge.from_dir(prep["siglip_dir"]).score(data.images, data.captions)["siglip_score"]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=ARMS, help="which arms to run and tabulate, e.g. af (default: abcdef)")
    p.add_argument("--seeds", type=int, default=3,
                   help="training seeds 0 .. N-1 of every arm (train.seed=S, in OUT/ARM/seed-S; default 3; "
                        "--seed: the evaluation's)")
    p.add_argument("--out", help="output directory, one run per arm and seed + the results (default: runs/ablations, "
                                 "or runs/ablations-maxN with --max-steps N, so capped runs never pass for full ones)")
    p.add_argument("--max-steps", type=int, help="cap every stage at N steps (a quick check of the pipeline)")
    add_eval_args(p, **COMPARISON_DEFAULTS)
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm and seed, e.g. "
                                                "train.repa.weight=0.5 (not train.seed: --seeds sets it)")
    args = p.parse_args(argv)
    if not args.arms or set(args.arms) - set(ARMS):
        p.error(f"--arms takes letters of {ARMS}")
    check_eval_args(p, args, positive=("max_steps", "seeds"))
    if error := stats.check_seed_free(args.overrides):
        p.error(error)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from janusflow.train.prep import cache_root, prepare

    out = Path(args.out or ("runs/ablations" if args.max_steps is None else f"runs/ablations-max{args.max_steps}"))
    eval_kwargs = eval_kwargs_of(args)
    settings = {**eval_kwargs, "max_steps": args.max_steps, "overrides": args.overrides}
    try:
        recipes = seed_recipes(args.arms, args.overrides, out, args.seeds, args.max_steps)
        # The runs live in OUT: keep the prep artefacts where the recipes' own runs (runs/_cache) find them.
        os.environ.setdefault("JANUSFLOW_CACHE", str(cache_root(load_recipe("ablation-f", args.overrides))))
        prep = prepare(next(reversed(recipes.values())))
        if prep["data_dir"] is None or prep["siglip_dir"] is None:
            raise ConfigError("the ablation recipes need the shapes world and the prep's SigLIP (prep.siglip_steps)")
        out.mkdir(parents=True, exist_ok=True)
        records = [run_arm(arm, recipe, prep, eval_kwargs, settings) for (arm, _), recipe in recipes.items()]
    except ConfigError as e:
        print(f"ablations.py: error: {e}", file=sys.stderr)
        return 2
    text = markdown(records, eval_kwargs, real_siglip_score(prep, args.num_fd_images))
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(records, indent=2))
    plot(records, out / "results.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.png'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
