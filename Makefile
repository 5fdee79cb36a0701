# Two commands a new user needs:  make demo  (the main job on the simulators)  and  make test  (all tests).
# make demo DEMO_SOURCE=azure  runs the demo with Defender for IoT in Azure (the Azure simulator) as the source;
# make demo DEMO_ARGS="--duration 300" (or --check) passes options to scripts/demo.py (see its --help).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast test-distributed lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python scripts/demo.py $(if $(DEMO_SOURCE),--source $(DEMO_SOURCE)) $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q -ra

# CeleryExecutor on real Postgres and Redis (Debian packages postgresql, redis-server; .ci/run installs them).
test-distributed: install
	$(BIN)/python -m pytest -q -ra -m distributed

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not live and not distributed"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/servicenow_hook.py
	$(BIN)/python benchmarks/defender_extract.py
	$(BIN)/python benchmarks/device_sync.py
	$(BIN)/python benchmarks/alert_forwarding.py
	$(BIN)/python benchmarks/azure_sync.py
	$(BIN)/python benchmarks/relations.py

clean:
	rm -rf .demo .pytest_cache
