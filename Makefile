# janusflow: `make pretrain` trains the default recipe, `make test` runs the test suite.
# Both set up the environment first (scripts/setup_env.sh; a no-op once installed).
VENV ?= .venv
PY := $(if $(JANUSFLOW_USE_ACTIVE_ENV),python,$(VENV)/bin/python)
RECIPE ?= 2to8
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: setup pretrain test lint compare-repa ablations rehearsal clean-runs

setup:
	@bash scripts/setup_env.sh $(VENV) dev

# Training needs no test/lint/demo packages (the dev extras): a fresh `make pretrain` skips them.
pretrain:
	@bash scripts/setup_env.sh $(VENV) none
	$(PY) tools/train.py --recipe $(RECIPE) $(ARGS)

# Any non-zero pytest exit fails, "no tests collected" (5) included: a broken collection must not pass.
test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check janusflow tools tests benchmarks scripts

compare-repa: setup
	$(PY) tools/compare_repa.py --recipe $(RECIPE) $(ARGS)

# The paper's ablations A-F (recipes/ablation-*.yaml): runs/ablations/results.{md,png}. Resumable.
ablations: setup
	$(PY) tools/ablations.py $(ARGS)

# The 1.3B recipe at official widths and 2 blocks deep, ZeRO-3 on 2 CPU ranks, end to end (tools/rehearsal.py).
rehearsal:
	@bash scripts/setup_env.sh $(VENV) none
	$(PY) tools/rehearsal.py $(ARGS)

clean-runs:
	rm -rf runs
