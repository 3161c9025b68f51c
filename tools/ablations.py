"""The paper's ablations A-F (JanusFlow Table 6) at toy scale: train every arm, evaluate it, tabulate and plot.

    python tools/ablations.py [--arms abcdef] [--out runs/ablations] [--max-steps N] [eval options] [key=value ...]
    make ablations                              # all six arms, then runs/ablations/results.{md,png}
    make ablations ARGS="--max-steps 5 --num-fd-images 16"   # a quick check, in runs/ablations-max5

    arm  REPA  understanding encoder         generation encoder  trained on
    A    no    SigLIP                        VAE + ConvNeXt      und + gen
    B    yes   VAE + ConvNeXt (shared)       VAE + ConvNeXt      und + gen
    C    yes   VAE + ConvNeXt (separate)     VAE + ConvNeXt      und + gen
    D    -     SigLIP                        -                   und only
    E    yes   -                             VAE + ConvNeXt      gen only
    F    yes   SigLIP                        VAE + ConvNeXt      und + gen  (JanusFlow)

Arm X is ``recipes/ablation-x.yaml`` (A-E inherit F and change only their ablation: same prep caches, data, seeds
and steps), trained in ``OUT/x`` (resumable: finished stages are skipped, an interrupted one continues from its
checkpoint). Its exported EMA model is then evaluated once (janusflow.eval.runner, kept in ``OUT/x/eval.json`` and
reused while the settings match): VQA accuracy on held-out questions, FD in SigLIP space, shapes-GenEval, the SigLIP
image-text score and the RF validation loss. A metric of a task the arm never trained on is n/a (D: generation,
E: understanding). ``OUT/results.md`` holds the table and ``OUT/results.png`` a bar chart per metric.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from janusflow.config import ConfigError, Recipe, load_recipe
from janusflow.eval.cli import COMPARISON_DEFAULTS, add_eval_args, check_eval_args
from janusflow.eval.cli import eval_kwargs as eval_kwargs_of

ARMS = "abcdef"
# (result key, column label, lower is better)
METRICS = (("vqa_acc", "VQA acc", False), ("fd", "FD", True), ("geneval/overall", "shapes-GenEval", False),
           ("siglip_score", "SigLIP score", False), ("rf_val", "RF val loss", True))
UND_ENCODERS = {"siglip": "SigLIP", "shared_gen": "VAE + ConvNeXt (shared)",
                "separate_gen": "VAE + ConvNeXt (separate)"}


# ----------------------------------------------------------------------------- arms


def arm_recipe(arm: str, overrides: list[str], out: Path, max_steps: int | None = None) -> Recipe:
    """recipes/ablation-<arm>.yaml in OUT/<arm>; ``max_steps`` caps every stage (a quick check of the pipeline)."""
    recipe = load_recipe(f"ablation-{arm}", [*overrides, f"run_dir={out / arm}"])
    if max_steps is not None:
        for stage in recipe.stages:
            stage.max_steps = min(stage.max_steps, max_steps)
    return recipe


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
    """Train (or resume) one arm and evaluate its export; the record is cached in OUT/<arm>/eval.json."""
    from janusflow.eval.runner import evaluate_export
    from janusflow.train.trainer import Trainer

    run_dir = recipe.resolved_run_dir
    cached = run_dir / "eval.json"
    if cached.exists():
        record = json.loads(cached.read_text())
        if record["settings"] == settings:
            log(f"ablation {arm.upper()}: done already ({cached})")
            return record
    setup = arm_setup(recipe)
    start = time.time()
    Trainer(recipe, group="ablations", run_name=f"ablation-{arm}").run()
    train_s = time.time() - start
    log(f"ablation {arm.upper()}: trained in {train_s:.0f} s, evaluating {'+'.join(setup['tasks'])}")
    start = time.time()
    results = evaluate_export(run_dir / "export", prep["data_dir"], siglip_dir=prep["siglip_dir"],
                              tasks=tuple(setup["tasks"]), **eval_kwargs)
    record = {"arm": arm, "setup": setup, "settings": settings, "results": results,
              "seconds": {"train": train_s, "eval": time.time() - start}}
    cached.write_text(json.dumps(record, indent=2))
    return record


# ----------------------------------------------------------------------------- table and figure


def best_values(records: list[dict]) -> dict[str, float]:
    """The best value of each metric over the arms that have it (none where they all tie)."""
    best = {}
    for key, _, lower in METRICS:
        values = [r["results"][key] for r in records if key in r["results"]]
        if len(set(values)) > 1:
            best[key] = min(values) if lower else max(values)
    return best


def markdown(records: list[dict], eval_kwargs: dict, real_siglip_score: float | None = None) -> str:
    """The results table (best value of each column in bold, n/a where the arm never trained the task);
    ``real_siglip_score``: the score of the held-out real images with their captions, for scale."""
    best = best_values(records)
    head = ["arm", "REPA", "und. encoder", "gen. encoder", "trained on",
            *(f"{label} {'↓' if lower else '↑'}" for _, label, lower in METRICS)]
    lines = ["# JanusFlow ablations (paper Table 6) at toy scale", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        s = r["setup"]
        repa = "-" if s["repa"] is None else ("yes" if s["repa"] else "no")
        name = r["arm"].upper() + (" (JanusFlow)" if r["arm"] == "f" else "")
        cells = [name, repa, s["und_encoder"] or "-", s["gen_encoder"] or "-", s["trained_on"]]
        for key, _, _ in METRICS:
            v = r["results"].get(key)
            cells.append("n/a" if v is None else (f"**{v:.4f}**" if v == best.get(key) else f"{v:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    steps = ", ".join(f"{r['arm'].upper()} {' + '.join(map(str, r['setup']['steps']))}" for r in records)
    lines += ["", f"Steps per stage (adaptation + unified pre-training): {steps}; batch and seeds as in "
              f"recipes/ablation-f.yaml. D and E are data-matched as in the paper: fewer steps, so that each sees "
              f"F's amount of its own task's data (not more), and their columns compare single-task training with "
              f"F at equal data of that task. VQA: exact match on "
              f"{eval_kwargs['num_vqa']} held-out questions. FD: {eval_kwargs['num_fd_images']} generated vs held-out "
              f"images in the prep SigLIP's feature space. shapes-GenEval: {eval_kwargs['num_geneval_per_category']} "
              f"prompts per category. SigLIP score: mean SigLIP match probability of each FD image with its prompt "
              f"(the prep's SigLIP, both towers). Sampler: Euler, {eval_kwargs['steps']} steps, CFG "
              f"{eval_kwargs['cfg_weight']}, seed {eval_kwargs['seed']}. n/a: the arm never trained that task."]
    if real_siglip_score is not None:
        lines += ["", f"For scale: the held-out real images with their own captions have a SigLIP score of "
                      f"{real_siglip_score:.4f}."]
    lines += ["", "Seconds (of the invocation that finished each arm):", "",
              "| arm | train s | eval s |", "|---|---|---|"]
    lines += [f"| {r['arm'].upper()} | {r['seconds']['train']:.0f} | {r['seconds']['eval']:.0f} |" for r in records]
    total = sum(r["seconds"]["train"] + r["seconds"]["eval"] for r in records)
    lines += [f"| total | {total:.0f} | |", ""]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """One bar chart per metric (arms on the x axis, F highlighted, n/a written where an arm has no value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = METRICS[:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8))
    names = [r["arm"].upper() for r in records]
    for ax, (key, label, lower) in zip(axes, shown):
        values = [r["results"].get(key) for r in records]
        colors = ["tab:red" if r["arm"] == "f" else "tab:gray" for r in records]
        ax.bar(names, [0.0 if v is None else v for v in values], color=colors)
        top = max((v for v in values if v is not None), default=1.0) or 1.0
        for i, v in enumerate(values):
            ax.text(i, (v if v is not None else 0.0) + 0.01 * top, "n/a" if v is None else f"{v:.3g}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{label} ({'lower' if lower else 'higher'} is better)")
        ax.set_ylim(0, top * 1.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("JanusFlow ablations at toy scale (F = JanusFlow: SigLIP + REPA, decoupled encoders)")
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
    p.add_argument("--out", help="output directory, one run per arm + the results (default: runs/ablations, or "
                                 "runs/ablations-maxN with --max-steps N, so capped runs never pass for full ones)")
    p.add_argument("--max-steps", type=int, help="cap every stage at N steps (a quick check of the pipeline)")
    add_eval_args(p, **COMPARISON_DEFAULTS)
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm, e.g. train.seed=1")
    args = p.parse_args(argv)
    if not args.arms or set(args.arms) - set(ARMS):
        p.error(f"--arms takes letters of {ARMS}")
    check_eval_args(p, args, positive=("max_steps",))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from janusflow.train.prep import cache_root, prepare

    out = Path(args.out or ("runs/ablations" if args.max_steps is None else f"runs/ablations-max{args.max_steps}"))
    eval_kwargs = eval_kwargs_of(args)
    settings = {**eval_kwargs, "max_steps": args.max_steps, "overrides": args.overrides}
    arms = [a for a in ARMS if a in args.arms]
    try:
        recipes = {a: arm_recipe(a, args.overrides, out, args.max_steps) for a in arms}
        # The runs live in OUT: keep the prep artefacts where the recipes' own runs (runs/_cache) find them.
        os.environ.setdefault("JANUSFLOW_CACHE", str(cache_root(load_recipe("ablation-f", args.overrides))))
        prep = prepare(recipes[arms[-1]])
        if prep["data_dir"] is None or prep["siglip_dir"] is None:
            raise ConfigError("the ablation recipes need the shapes world and the prep's SigLIP (prep.siglip_steps)")
        out.mkdir(parents=True, exist_ok=True)
        records = [run_arm(a, recipes[a], prep, eval_kwargs, settings) for a in arms]
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
