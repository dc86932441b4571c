# Every target bootstraps .venv itself; `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint bench bench-check e2e clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/greenfleet demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	bash tests/runtime_env/run.sh
	bash tests/tf_env/run.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy agent controller model_store device_configs benchmarks simulator

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# The performance gate CI runs after the tests: the benchmarks of the paths every device pays
# for, each held to a regression line (benchmarks/gate.py); then which recorded figures are
# stale (benchmarks/freshness.py). Needs Mosquitto, as the tests do.
bench-check: $(STAMP)
	$(BIN)/python -m benchmarks.run --gate
	$(BIN)/python -m benchmarks.freshness

clean:
	rm -rf $(VENV) .venv-tflite-runtime .venv-tf .venv-agent .greenfleet
