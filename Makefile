# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
PY ?= python3
VENV ?= .venv
ARGS ?=

.PHONY: setup demo test test-unit services-start services-stop bench soak clean-local collector bench-collector

$(VENV)/.installed: pyproject.toml
	@$(PY) -c 'import sys; ok = (3, 11) <= sys.version_info[:2] < (3, 13); sys.exit(0 if ok else "clickpulse needs Python 3.11 or 3.12 (pyproject.toml: requires-python >=3.11,<3.13); $(PY) is " + sys.version.split()[0] + ": run make PY=python3.12")'
	@echo "[setup] creating $(VENV) with $$($(PY) --version) ..."
	$(PY) -m venv $(VENV)
	@echo "[setup] upgrading pip ..."
	$(VENV)/bin/pip install --progress-bar off --upgrade pip
	@echo "[setup] installing clickpulse and its dependencies (Faust, River, aiokafka, RocksDB bindings, CEL ...) into $(VENV); about a minute the first time ..."
	$(VENV)/bin/pip install --progress-bar off -e ".[test]"
	@echo "[setup] done: $(VENV)/bin/clickpulse --version: $$($(VENV)/bin/clickpulse --version)"
	touch $@

setup: $(VENV)/.installed

# main job on real data: local Kafka + Redis, a worker, the bundled REES46 sample -> ./demo-output
demo: setup
	$(VENV)/bin/clickpulse demo $(ARGS)

# every test: unit + doctests + integration against the real local Kafka and Redis
test: setup
	deploy/local/services.sh start
	$(VENV)/bin/python -m pytest

test-unit: setup
	$(VENV)/bin/python -m pytest -m "not integration"

services-start:
	deploy/local/services.sh start

services-stop:
	deploy/local/services.sh stop

# one table: aiokafka / Faust / Quix Streams / clickpulse, 3 interleaved reps, latency, RSS
# (ARGS="--events 20000 --reps 1 --json" ...; the scripts start the local services if no broker answers)
bench: setup
	$(VENV)/bin/python -c 'import quixstreams, psutil' 2>/dev/null || $(VENV)/bin/pip install -q -e ".[bench]"
	$(VENV)/bin/python benchmarks/pipeline.py $(ARGS)

# the worker's RSS under a steady stream of new users (ARGS="--rate 200 --minutes 10"); not a CI test
soak: setup
	$(VENV)/bin/python -c 'import psutil' 2>/dev/null || $(VENV)/bin/pip install -q -e ".[bench]"
	$(VENV)/bin/python benchmarks/soak.py $(ARGS)

# the Segment/RudderStack HTTP tracking API on :8088 (ARGS="--port 8090"; needs
# CLICKPULSE_COLLECTOR_WRITE_KEYS); `make bench-collector` measures it beside a bare produce loop
collector: setup
	$(VENV)/bin/clickpulse collector $(ARGS)

bench-collector: setup
	$(VENV)/bin/python benchmarks/collector.py $(ARGS)

# stop services and delete broker data, jars cache and worker data
clean-local: services-stop
	rm -rf .local
