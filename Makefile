# Two commands set up a fresh machine:  make demo  (the offline demo)  and  make test.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: demo test test-fast venv data browser lint clean-demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install --quiet -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither"; test $${PIPESTATUS[0]} -eq 0
	touch $@

venv: $(VENV)/.installed

# Debian's Fashion-MNIST package, where apt is available (the demo's data; tests do not need it).
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "no apt-get: set world.source in params.yaml to a folder with the Fashion-MNIST idx files"; fi

# Debian's Chromium, where apt is available: the tests load the report page in a real headless browser
# (without one they are skipped, with the reason).
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    ( $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null ) ) || \
	  echo "could not install chromium: the report page's browser tests will be skipped"; \
	else echo "no apt-get: the report page's browser tests will be skipped"; fi

demo: venv data
	kd3 check
	dvc repro

test: venv browser
	$(PY) -m pytest

# The inner loop: the tests not marked slow, in parallel (a minute or two on 2 cores).
test-fast: venv
	$(PY) -m pytest -n auto -m "not slow and not network and not gpu"

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean-demo:
	rm -rf data/world data/crawl
