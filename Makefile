# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

data/synth/train_ims.npy: | $(STAMP)
	$(BIN)/python -m study data synth --out data/synth

# The main job: one training run (results, then where MLflow is), then the pipeline the docs
# recommend for a table: every ablation row, base included, gets its own small search (the same
# budget each), then runs over the seeds at its searched values. A fresh name each time, so
# `make demo` can be run again.
DEMO_TUNE_ROWS ?= 4
demo: $(STAMP) data/synth/train_ims.npy
	$(BIN)/python -m study train studies/demo.yaml
	$(BIN)/python -m study ablate studies/ablation-demo.yaml --tune-rows $(DEMO_TUNE_ROWS) \
		--set name=demo-$(shell date +%Y%m%d-%H%M%S)

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) data results mlruns.db

# The quick benchmark subset (about 5 minutes here): writes benchmarks/results.md. See benchmarks/README.md.
bench: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(BIN)/python -m benchmarks.quick
.PHONY: bench
