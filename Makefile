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

.PHONY: venv system-deps browser test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(MAKE) --no-print-directory system-deps
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests and the demo use, installed only when missing and apt-get exists (sudo only when not
# root): headless Chromium + its driver (tests/test_web_page.py), Noto Color Emoji and Unicode's emoji data (the
# held-out style: pipeline.heldout). Nothing happens when all are there. A failed install is a warning: the tests
# that need them then skip (or fail where CI is set), and the demo skips its held-out evaluation.
SYSTEM_FILES := /usr/bin/chromium /usr/bin/chromedriver /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf \
                /usr/share/unicode/emoji/emoji-test.txt
SYSTEM_PKGS  := chromium chromium-driver fonts-noto-color-emoji unicode-data
system-deps:
	@missing=0; for f in $(SYSTEM_FILES); do [ -e $$f ] || missing=1; done; [ $$missing = 1 ] || exit 0; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get: install $(SYSTEM_PKGS) (or their equivalents) for the browser and held-out tests"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	echo "installing $(SYSTEM_PKGS)"; \
	{ $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PKGS); } || \
	  echo "warning: could not install $(SYSTEM_PKGS): the tests that need them skip (fail under CI)"

browser: system-deps

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP) system-deps
	$(PY) -m pipeline.demo $(DEMO_ARGS)

clean:
	rm -rf demo .pytest_cache
