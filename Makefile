# Two commands for a fresh clone: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ktulhu-installed

GPU ?=

.PHONY: setup model serve test system-packages doctor bench-store bench-engine bench-router bench-ws bench-loop-lag bench-scale bench-http router-model router-eval clean

# The virtual environment, rebuilt when pyproject.toml changes. llama-cpp-python is compiled for this
# CPU (native, AMX kernels off) once per machine and kept in ~/.cache/ktulhu/wheels/ under a key of the
# CPU's instruction sets and the build flags, so a wheel is never reused on a CPU it was not built for
# (docs/configuration.md). GPU=cuda builds the CUDA variant; later set-ups keep the variant installed.
$(STAMP): pyproject.toml ktulhu/native_build.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m ktulhu.native_build install $(if $(GPU),--gpu $(GPU))
	$(BIN)/pip install --disable-pip-version-check -e '.[test]'
	touch $@

# Also re-checks that the installed build fits this CPU (instant when it does; a copied .venv rebuilds).
setup: $(STAMP)
	$(BIN)/python -m ktulhu.native_build install $(if $(GPU),--gpu $(GPU))

# Verifies the default model (fast) and fetches it only when missing or corrupt.
model: $(STAMP)
	$(BIN)/ktulhu models pull

serve: setup model
	$(BIN)/ktulhu serve

# Can this machine serve this configuration? One line per check, with the fix.
doctor: setup model
	$(BIN)/ktulhu doctor

# Debian packages the tests drive for real: Chromium (browser tests; no browser download by
# playwright), nginx (the reverse-proxy recipe), systemd-analyze (the unit file), PostgreSQL (the
# shared store's tests start their own server in a temp dir).
SYSTEM_PACKAGES := /usr/bin/chromium:chromium /usr/sbin/nginx:nginx /usr/bin/systemd-analyze:systemd \
	/usr/lib/postgresql:postgresql
system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
		[ -x "$${entry%%:*}" ] || missing="$$missing $${entry#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && $$SUDO apt-get install -y $$missing; \
	fi

test: setup model system-packages
	$(BIN)/python -m pytest

bench-store: setup
	$(BIN)/python -m bench.store

# Our engine vs llama-server (built once from the pinned llama.cpp sources) vs the original's design.
bench-engine: setup model
	$(BIN)/pip install --disable-pip-version-check -q -e '.[bench]'
	$(BIN)/python -m bench.engine

# The served engine vs llama-server over HTTP: the same streaming /v1 requests, 1/4/8/16 streams.
bench-http: setup model
	$(BIN)/python -m bench.http

# Event-loop lag while a 1 MB /v1 body and a 1,000-message chat are prompted (target < 50 ms).
bench-loop-lag: setup model
	$(BIN)/python -m bench.loop_lag

# The scale-out topology (PostgreSQL, llama-server workers, front-ends, nginx): remote-mode overhead
# and chat affinity; the PostgreSQL store's figures come from bench-store.
bench-scale: setup model
	$(BIN)/python -m bench.scale

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
