# warmstart — every target creates and fills its own virtual environment first,
# so each works on a fresh machine. Override PYTHON or TORCH_SPEC if needed.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The main job's settings: `make run DATASET=ml-100k DATA_PATH=../shared/data/ml-100k`.
# Empty = the job's default (synthetic data, repository $WARMSTART_MODEL_REPOSITORY or models/,
# model $WARMSTART_MODEL_NAME or warmstart). TRAIN_ARGS go to `python -m training.cli train`,
# SERVE_ARGS to `python -m service.server`; RETRAIN=1 trains a new version even if one exists.
DATASET ?=
DATA_PATH ?=
REPOSITORY ?=
MODEL_NAME ?=
TRAIN_ARGS ?=
SERVE_ARGS ?=
RETRAIN ?=
RUN_ARGS = $(if $(DATASET),--dataset "$(DATASET)") $(if $(DATA_PATH),--data-path "$(DATA_PATH)") \
  $(if $(REPOSITORY),--repository "$(REPOSITORY)") $(if $(MODEL_NAME),--model-name "$(MODEL_NAME)") \
  $(if $(TRAIN_ARGS),--train-args "$(TRAIN_ARGS)") $(if $(filter 1 yes true,$(RETRAIN)),--retrain)

.PHONY: install run test promtool protos lint bench clean

# The install steps. The Dockerfile runs the same pip lines (tests/ops/test_dockerfile.py
# checks it): torch first, pinned, so the project's range does not pull a different build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[train,torch-engine,dev,eval]"
	@touch $(STAMP)

install: $(STAMP)

## The main job: train on the embedded synthetic data unless an artifact exists, then serve.
run: $(STAMP)
	$(PY) scripts/main.py $(strip $(RUN_ARGS) -- $(SERVE_ARGS))

## The whole test suite (what .ci/run calls); installs promtool first when it is missing.
## TEST_WORKERS processes share the tests, a file per process at a time (0 = one process).
test: $(STAMP) promtool
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## promtool (Debian's prometheus package) checks the alert rules and /metrics in tests/ops:
## installed with apt-get when missing (sudo when not root); elsewhere, a hint and go on
## (those tests then fail with the same hint).
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	    echo "installing promtool (Debian's prometheus package) for tests/ops ..."; \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool is missing and there is no apt-get: install Prometheus' promtool for tests/ops" >&2; \
	  fi; }

## Regenerate the protobuf / gRPC modules from protos/.
protos: $(STAMP)
	$(PY) scripts/gen_protos.py

lint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

## The engine benchmark (bench/README.md): `make bench BENCH_ARGS="--quick"`,
## `make bench BENCH_ARGS="--artifact models/warmstart/1"`. On a GPU machine without network: bench/gpu_check.sh.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) bench/engine.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
