# Two commands for a fresh clone: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ktulhu-installed

.PHONY: setup model serve test browser bench-store bench-engine bench-router bench-ws router-model router-eval clean

# The virtual environment, rebuilt when pyproject.toml changes. llama-cpp-python compiles from
# source once; pip's wheel cache serves later installs of the same pinned version.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(STAMP)

# Verifies the default model (fast) and fetches it only when missing or corrupt.
model: $(STAMP)
	$(BIN)/ktulhu models pull

serve: setup model
	$(BIN)/ktulhu serve

# Headless Chromium for the browser tests (Debian's package; no browser download by playwright).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium; \
	fi

test: setup model browser
	$(BIN)/python -m pytest

bench-store: setup
	$(BIN)/python -m bench.store

# Our engine vs llama-server (built once from the pinned llama.cpp sources) vs the original's design.
bench-engine: setup model
	$(BIN)/pip install --disable-pip-version-check -q -e '.[bench]'
	$(BIN)/python -m bench.engine

bench-router: setup
	$(BIN)/python -m bench.router

# The server as its own process: 1,000 idle sockets, 16 active chats, /ws vs the engine directly.
bench-ws: setup model
	$(BIN)/python -m bench.ws_load

# Rebuilds models/intent_router/ from data/intents/ (CPU, deterministic, about 20 minutes on two cores).
router-model: setup
	$(BIN)/pip install --disable-pip-version-check -q -e '.[train]'
	$(BIN)/ktulhu router train

router-eval: setup
	$(BIN)/ktulhu router eval

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
