# Two entry points (see README): `make serve` runs the main job, `make test` the whole suite.
# Each creates .venv in the checkout and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= osum-mini

# Debian packages the tests use: real speech with transcripts (Asterisk's English prompts), Redis,
# Chromium with its WebDriver for the browser page test, and flite (a synthetic voice for evaluate --tts)
APT_TEST := asterisk-core-sounds-en-wav asterisk-core-sounds-en redis-server chromium chromium-driver flite

.PHONY: serve demo test bench-encoder clean

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# on the project's machines this takes the local CPU wheel; elsewhere PyPI's build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]' -e clients/python
	touch $@

serve: $(VENV)/.installed $(VENV)/.system
	$(BIN)/osum-serve --model $(MODEL)

demo: $(VENV)/.installed
	$(BIN)/osum transcribe osum/assets/arctic_a0007.wav --model $(MODEL) --task asr --max-new-tokens 60

$(VENV)/.system:
	@missing=""; for p in $(APT_TEST); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	else echo "warning: not installed:$$missing (tests that need them use fewer clips)"; fi
	mkdir -p $(VENV) && touch $@

test: $(VENV)/.installed $(VENV)/.system
	$(BIN)/python -m pytest -q

bench-encoder: $(VENV)/.installed
	$(BIN)/python load_tests/bench_encoder.py

clean:
	rm -rf $(VENV) .pytest_cache
