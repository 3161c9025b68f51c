"""Statistics over training seeds (janusflow.eval.seeds) by hand, and the multi-seed REPA comparison
(tools/compare_repa.py): its report from fake per-seed curves, and what ``--seeds N`` runs, with a fake trainer."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from janusflow.config import ConfigError, to_dict
from janusflow.eval import seeds as stats

ROOT = Path(__file__).resolve().parent.parent
T_975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 30: 2.0423}  # t(0.975, df), from a printed t table


# ----------------------------------------------------------------------------- statistics


def test_mean_sd_standard_error_and_t_interval_by_hand():
    assert stats.mean([1.0, 2.0, 3.0]) == 2.0
    assert stats.sample_sd([1.0, 2.0, 3.0]) == pytest.approx(1.0)  # n - 1: sqrt((1 + 0 + 1) / 2)
    assert stats.sample_sd([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx(math.sqrt(32 / 7))
    assert stats.standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    for df, t in T_975.items():
        assert stats.t_quantile(df) == pytest.approx(t, abs=1e-4)
    e = stats.estimate([1.0, 2.0, 3.0])
    assert (e.mean, e.n) == (2.0, 3) and e.half_width == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert e.format() == "2.0000 ± 2.4841" and e.format(2, suffix="x") == "2.00x ± 2.48x"
    assert e.excludes_zero() is False  # 2 - 2.48 < 0
    assert stats.estimate([10.0, 11.0, 12.0]).excludes_zero() is True
    assert stats.estimate([-10.0, -11.0, -12.0]).excludes_zero() is True
    wide = stats.estimate([1.0, 3.0])  # df 1: t = 12.706, se = 1
    assert wide.half_width == pytest.approx(12.7062, abs=1e-4)
    with pytest.raises(ValueError):
        stats.mean([])


def test_one_seed_has_no_interval():
    assert stats.sample_sd([5.0]) is None and stats.standard_error([5.0]) is None
    e = stats.estimate([5.0])
    assert e.half_width is None and e.excludes_zero() is None
    assert e.format() == "5.0000 ± n/a (1 seed)"
    assert stats.estimate([-0.5]).format(2, sign=True) == "-0.50 ± n/a (1 seed)"


def test_paired_difference_uses_the_seeds_both_arms_ran():
    a, b = {0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0, 7: 100.0}
    d = stats.paired_difference(a, b)  # differences 2, 3, 1: seed 7 has no partner
    assert (d.mean, d.n) == (2.0, 3) and d.half_width == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert d.excludes_zero() is False  # 2 ± 2.48
    # Pairing removes a shared seed effect that unpaired intervals would keep: a = b + 1 exactly.
    base = {0: 1.0, 1: 10.0, 2: 100.0}
    shifted = stats.paired_difference({s: v + 1 for s, v in base.items()}, base)
    assert shifted.mean == pytest.approx(1.0) and shifted.half_width == pytest.approx(0.0, abs=1e-9)
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None
    assert stats.paired_difference({0: 2.0, 1: 3.0}, {0: 1.0}).n == 1


def test_steps_to_reach_and_speedup():
    steps = [0, 100, 200, 300]
    assert stats.steps_to_reach(steps, [9.0, 6.0, 4.0, 5.0], 5.0, lower_is_better=True) == 200
    assert stats.steps_to_reach(steps, [0.0, 0.1, 0.3, 0.2], 0.25, lower_is_better=False) == 200
    assert stats.steps_to_reach(steps, [9.0, 8.0, 7.0, 6.0], 5.0, lower_is_better=True) is None
    assert stats.speedup(300, 150) == 2.0 and stats.speedup(300, None) is None and stats.speedup(None, 100) is None
    assert stats.speedup(300, 0) is None


def test_curve_band_over_the_steps_every_curve_has():
    steps, means, half = stats.curve_band([([0, 1, 2], [1.0, 2.0, 3.0]), ([0, 2], [3.0, 4.0])])
    assert steps == [0, 2] and means == [2.0, 3.5]
    assert half == pytest.approx([12.706205 * 1.0, 12.706205 * 0.5], abs=1e-3)  # sd/sqrt(2) = |a - b| / 2
    assert stats.curve_band([([0, 5], [1.0, 2.0])]) == ([0, 5], [1.0, 2.0], None)


def test_seed_dirs_and_overrides():
    assert stats.seed_dir("runs/x", 2) == Path("runs/x/seed-2")
    assert stats.seed_overrides(["a.b=1"], 2) == ["a.b=1", "train.seed=2"]
    assert stats.check_seed_free(["train.lr=1", "train.seed_x=3"]) is None
    assert "--seeds" in stats.check_seed_free(["train.seed=3"])


# ----------------------------------------------------------------------------- the REPA comparison's report


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_repa", ROOT / "tools" / "compare_repa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STEPS = [0, 100, 200, 300]
# seed: (FD off, FD on, GenEval off, GenEval on). FD's final level (REPA-off's 4.0 at step 300) is reached by
# REPA-on at 200 (seed 0: 1.5x), 300 (seed 1: 1.0x) and never (seed 2); GenEval's 0.3 at 200, 100, 200.
FAKE = {0: ([10, 8, 6, 4], [10, 6, 4, 3], [0, .1, .2, .3], [0, .2, .3, .4]),
        1: ([10, 7, 5, 4], [10, 5, 4.5, 4], [0, .1, .2, .3], [0, .3, .35, .4]),
        2: ([10, 8, 6, 4], [10, 9, 8, 7], [0, .1, .2, .3], [0, .2, .3, .4])}


def _fake_summary(compare, seed: int) -> dict:
    fd_off, fd_on, ge_off, ge_on = FAKE[seed]
    loss = [1.0 - 0.1 * i - 0.01 * seed for i in range(8)]
    curves = {"repa-off": {"eval/fd": (STEPS, fd_off), "eval/geneval/overall": (STEPS, ge_off),
                           "loss_rf": (list(range(0, 400, 50)), loss)},
              "repa-on": {"eval/fd": (STEPS, fd_on), "eval/geneval/overall": (STEPS, ge_on),
                          "loss_rf": (list(range(0, 400, 50)), [v - 0.05 for v in loss])}}
    curves = {arm: {k: (list(s), [float(x) for x in v]) for k, (s, v) in c.items()} for arm, c in curves.items()}
    return {"seed": seed, "recipe": "fake", "stage": "pretrain", "recipe_diff": {"stages.1.repa_weight": [1.0, 0.0]},
            "repa_weight": 1.0, "steps": 300, "eval_every": 100,
            "eval_settings": dict(num_geneval_per_category=8, num_fd_images=128, num_vqa=64, num_rf_images=32,
                                  steps=20, cfg_weight=2.0, seed=0, batch_size=32),
            "seconds": {"stage 1 (shared)": 10.0, "repa-on": 20.0, "repa-off": 20.0},
            "levels": compare.level_rows(curves["repa-on"], curves["repa-off"]),
            "final": {arm: compare.final_numbers(curves[arm]) for arm in compare.ARMS},
            "curves": {arm: {k: [list(s), list(v)] for k, (s, v) in c.items()} for arm, c in curves.items()}}


def _table(text: str, title: str) -> list[list[str]]:
    """The body rows (cells) of the markdown table under ``## title...``."""
    section = text.split(f"## {title}", 1)[1].split("\n\n")[1]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines()[2:]]


def _table_rows(text: str, title: str) -> dict[str, list[str]]:
    """The speed-up table: {"metric @ pick": the other cells}."""
    return {f"{r[0]} @ {r[1]}": r[2:] for r in _table(text, title)}


def test_level_picks_report_a_level_only_where_repa_off_improved():
    compare = _compare_module()
    picks = compare.level_picks(STEPS, [10.0, 10.0, 6.0, 4.0], lower_is_better=True)
    assert picks == [("1/3", 100, None), ("2/3", 200, 6.0), ("end", 300, 4.0)]
    assert [p[2] for p in compare.level_picks(STEPS, [0.5, 0.4, 0.3, 0.2], lower_is_better=False)] == [None] * 3


def test_report_over_three_seeds_gives_mean_and_interval_and_lists_every_seed(tmp_path):
    compare = _compare_module()
    report = compare.aggregate([_fake_summary(compare, s) for s in (0, 1, 2)])
    json.dumps(report)  # what compare_repa.json holds
    text = compare.markdown(report)
    assert "3 seeds (train.seed 0, 1, 2)" in text and "± n/a" not in text
    # FD to REPA-off's final level: seeds 0 and 1 reach it with both arms (1.5x, 1.0x), seed 2's REPA-on never.
    half = 12.706205 * 0.25  # sd of (1.5, 1.0) / sqrt(2) = 0.25, df 1
    fd_end = _table_rows(text, "Steps to reach")["FD (SigLIP space) @ end"]
    assert fd_end[1] == "2 / 3" and fd_end[2] == f"1.25x ± {half:.2f}x"
    assert fd_end[3] == "s0: 300 → 200 (1.50x); s1: 300 → 300 (1.00x); s2: 300 → never in 300 (< 1.00x)"
    assert fd_end[0] == "<= 4.0000 ± 0.0000"  # REPA-off ends at 4.0 in every seed
    ge_end = _table_rows(text, "Steps to reach")["shapes-GenEval overall @ end"]  # 1.5x, 3.0x, 1.5x
    assert ge_end[1] == "3 / 3" and ge_end[2] == f"2.00x ± {4.302653 * math.sqrt(0.75) / math.sqrt(3):.2f}x"
    # The headline: the speed-ups to equal REPA-off's final FD and GenEval, with how many seeds reached them.
    assert f"- FD (SigLIP space): **1.25x ± {half:.2f}x** (2 of 3 seeds reached it with both arms" in text
    assert "- shapes-GenEval overall: **2.00x ± 2.15x** (3 of 3 seeds" in text
    # Final numbers: FD on (3, 4, 7) vs off (4, 4, 4): the paired differences (-1, 0, 3) include 0.
    final = {r[0]: r[1:] for r in _table(text, "Final")}
    assert list(final) == ["eval/fd", "eval/geneval/overall", "loss_rf (mean of last 5 logged)"]
    fd = final["eval/fd"]
    assert fd[0] == f"4.6667 ± {4.302653 * stats.sample_sd([3, 4, 7]) / math.sqrt(3):.4f}"
    assert fd[1] == "4.0000 ± 0.0000" and fd[3].startswith("no (interval includes 0)")
    ge = final["eval/geneval/overall"]
    assert ge[2].startswith("+0.1000 ± 0.0000") and ge[3].startswith("yes: on higher")
    assert "| total | | | | 150 |" in text
    compare.plot(report, tmp_path / "band.png")
    assert (tmp_path / "band.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_one_seed_prints_na_instead_of_an_interval(tmp_path):
    compare = _compare_module()
    report = compare.aggregate([_fake_summary(compare, 0)])
    text = compare.markdown(report)
    assert "1 seed (train.seed 0)" in text
    assert _table_rows(text, "Steps to reach")["FD (SigLIP space) @ end"][1:3] == ["1 / 1", "1.50x ± n/a (1 seed)"]
    assert "- FD (SigLIP space): **1.50x ± n/a (1 seed)** (1 of 1 seeds" in text
    final = text.split("## Final")[1]
    assert "| 3.0000 ± n/a (1 seed) | 4.0000 ± n/a (1 seed) | -1.0000 ± n/a (1 seed) | n/a (1 seed) |" in final
    compare.plot(report, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0


def test_a_level_no_arm_reaches_is_reported_not_dropped():
    compare = _compare_module()
    summaries = [_fake_summary(compare, 2)]
    report = compare.aggregate(summaries)
    row = next(r for r in report["speedups"] if r["key"] == "eval/fd" and r["pick"] == "end")
    assert row["speedup"] is None and row["num_reached"] == 0 and len(row["per_seed"]) == 1
    text = compare.markdown(report)
    assert "- FD (SigLIP space): - (0 of 1 seeds reached it with both arms" in text
    assert "s2: 300 → never in 300 (< 1.00x)" in text


# ----------------------------------------------------------------------------- what --seeds N runs


class _FakeTrainer:
    """Records what compare_repa would train, and writes what a finished run leaves: recipe.json, the shared stage's
    final weights, and evaluation rows whose FD falls twice as fast with REPA (seed s: rate + s / 10)."""

    runs: list[dict] = []

    def __init__(self, recipe, tags, group=None, run_name=None, evaluate=None):
        self.recipe, self.tags, self.group, self.run_name = recipe, tags, group, run_name

    def stage_dir(self, index: int) -> Path:
        return self.recipe.resolved_run_dir / "stages" / f"{index + 1}-{self.recipe.stages[index].name}"

    def run(self) -> None:
        r, run_dir = self.recipe, self.recipe.resolved_run_dir
        _FakeTrainer.runs.append({"run_dir": run_dir, "seed": r.train.seed, "stages": len(r.stages),
                                  "name": self.run_name, "group": self.group, "tags": self.tags,
                                  "weight": r.stages[-1].repa_weight if len(r.stages) > 1 else None})
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(to_dict(r)))
        if len(r.stages) == 1:
            for part in ("final", "final_ema"):
                (self.stage_dir(0) / part).mkdir(parents=True, exist_ok=True)
            return
        assert (self.stage_dir(0) / "final_ema").is_dir()  # the shared stage 1 of this seed
        stage, rate = r.stages[1], (2.0 if r.stages[1].repa_weight > 0 else 1.0) + r.train.seed / 10
        rows = [{"stage": stage.name, "step": s, "eval/fd": 10.0 - rate * s, "eval/geneval/overall": 0.1 * rate * s}
                for s in range(0, stage.max_steps + 1, r.logging.sample_every)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_seeds_run_in_their_own_dirs_with_train_seed_and_are_reported_together(tmp_path, monkeypatch):
    monkeypatch.setenv("JANUSFLOW_CACHE", str(tmp_path / "_cache"))
    compare = _compare_module()
    monkeypatch.setattr(compare, "TaggedTrainer", _FakeTrainer)
    _FakeTrainer.runs = []
    out = tmp_path / "cmp"
    kwargs = dict(num_geneval_per_category=8, num_fd_images=16, num_vqa=4, num_rf_images=4, steps=2, cfg_weight=2.0,
                  seed=0, batch_size=4)
    report = compare.compare_seeds("tiny", ["train.ema_decay=0.5"], out, seeds=3, steps=4, eval_every=1,
                                   eval_kwargs=kwargs)
    runs = _FakeTrainer.runs
    assert [(r["run_dir"].relative_to(out).as_posix(), r["seed"], r["name"]) for r in runs] == [
        (f"seed-{s}/{arm}", s, f"{name}-seed{s}") for s in range(3)
        for arm, name in (("shared", "shared-stage1"), ("repa-on", "repa-on"), ("repa-off", "repa-off"))]
    assert {r["group"] for r in runs} == {"compare-repa-tiny"}
    assert [r["tags"] for r in runs[:3]] == [{"seed": 0, "arm": "shared"}, {"seed": 0, "arm": "repa-on"},
                                             {"seed": 0, "arm": "repa-off"}]
    assert [r["stages"] for r in runs[:3]] == [1, 2, 2] and [r["weight"] for r in runs[1:3]] == [1.0, 0.0]
    for s in range(3):
        recipe = json.loads((out / f"seed-{s}" / "repa-on" / "recipe.json").read_text())
        assert recipe["train"]["seed"] == s and recipe["train"]["ema_decay"] == 0.5
        assert (out / f"seed-{s}" / "compare_repa.md").read_text().count("n/a (1 seed)") > 0
    assert report["seeds"] == [0, 1, 2] and report["recipe_diff"] == {"stages.1.repa_weight": [1.0, 0.0]}
    # REPA-off reaches its final FD (10 - 4 r) at step 4; REPA-on (rate r + 1) at ceil(4 r / (r + 1)).
    fd_end = next(r for r in report["speedups"] if r["key"] == "eval/fd" and r["pick"] == "end")
    assert [row["speedup"] for row in fd_end["per_seed"]] == [2.0, 4 / 3, 4 / 3]
    assert fd_end["speedup"]["mean"] == pytest.approx((2 + 8 / 3) / 3) and fd_end["speedup"]["n"] == 3
    for name in ("compare_repa.png", "compare_repa.md", "compare_repa.json"):
        assert (out / name).stat().st_size > 0
    assert "3 seeds (train.seed 0, 1, 2)" in (out / "compare_repa.md").read_text()
    # Run again: the same seeds, the same dirs (each run resumes from its checkpoints).
    compare.compare_seeds("tiny", ["train.ema_decay=0.5"], out, seeds=1, steps=4, eval_every=1, eval_kwargs=kwargs)
    assert _FakeTrainer.runs[-1]["run_dir"] == out / "seed-0" / "repa-off"
    with pytest.raises(ConfigError, match="train.seed"):
        compare.compare_seeds("tiny", ["train.seed=4"], out, seeds=1, steps=4, eval_every=1, eval_kwargs=kwargs)


def test_seeds_option_defaults_to_three_and_refuses_train_seed(capsys):
    compare = _compare_module()
    assert compare.parse_args([]).seeds == 3 and compare.parse_args(["--seeds", "1"]).seeds == 1
    for bad in (["--seeds", "0"], ["train.seed=1"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)
    assert "train.seed" in capsys.readouterr().err


def test_told_apart_names_the_side_only_where_the_interval_excludes_zero():
    assert stats.told_apart(None, "up", "down") == "-"
    assert stats.told_apart(stats.estimate([0.5]), "up", "down") == "n/a (1 seed)"
    assert stats.told_apart(stats.estimate([1.0, -1.0, 0.5]), "up", "down") == "no (interval includes 0)"
    assert stats.told_apart(stats.estimate([1.0, 1.1, 0.9]), "up", "down") == "yes: up"
    assert stats.told_apart(stats.estimate([-1.0, -1.1, -0.9]), "up", "down") == "yes: down"
