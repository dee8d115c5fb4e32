# clipforge — `make test` and `make demo` bootstrap .venv by themselves (idempotent).
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.clipforge-installed
# torch + torchvision first (torchvision is a test-only peer, needed by open_clip); CUDA builds also run on CPU.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_ARGS  ?=
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: venv test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m pipeline.demo $(DEMO_ARGS)

clean:
	rm -rf demo .pytest_cache
