# warmstart — every target creates and fills its own virtual environment first,
# so each works on a fresh machine. Override PYTHON or TORCH_SPEC if needed.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast protos lint bench clean

# torch first, pinned, so the project's range does not pull a different build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[train,torch-engine,dev]"
	@touch $(STAMP)

install: $(STAMP)

## The main job: train on the embedded synthetic data unless an artifact exists, then serve.
run: $(STAMP)
	$(VENV)/bin/python -m service.main $(ARGS)

## The whole test suite (what .ci/run calls).
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Regenerate the protobuf / gRPC modules from protos/.
protos: $(STAMP)
	$(PY) scripts/gen_protos.py

lint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

bench: $(STAMP)
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache
