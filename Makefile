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

.PHONY: venv browser test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(MAKE) --no-print-directory browser
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# headless Chromium + its driver for tests/test_web_page.py (Debian packages), installed only when missing and
# apt-get exists; sudo only when not root. Nothing happens when both are there. A failed install is a warning: the
# test then skips (or fails where CI is set).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get: install chromium and chromedriver for the web page test"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	echo "installing chromium + chromium-driver (the web page test)"; \
	{ $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
	  echo "warning: could not install chromium / chromium-driver: tests/test_web_page.py will skip (fail under CI)"

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m pipeline.demo $(DEMO_ARGS)

clean:
	rm -rf demo .pytest_cache
