# One command each on a fresh machine: `make demo` (set up .venv, run the demo job), `make test` (set up, run tests).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "uv==0.13.9"
	# uv installs what pip would, from where pip would (.ci/uv_env.py reads pip's configuration), about twice as fast.
	# --compile-bytecode writes every .pyc now, as pip does: where PYTHONDONTWRITEBYTECODE=1 (as on the CI machine)
	# Python would otherwise compile torch, ray and pyarrow from source in every process and Ray worker, every time
	# (importing them took 18 s instead of 9.7 s, measured)
	eval "$$($(BIN)/python .ci/uv_env.py)" && $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# one line per stage, then the metrics table; `make demo DEMO_ARGS=--verbose` for every message and Ray's own logs
demo: setup
	@$(BIN)/newsclip demo $(DEMO_ARGS)

test: setup
	$(BIN)/ruff check newsclip tests benchmarks jobs cluster
	$(BIN)/python -m compileall -q -j0 newsclip  # newsclip's own .pyc, for the same reason (the editable install)
	$(BIN)/python -m pytest -q --durations=15

# the `not slow` subset: no whole job, no model trained (about 2 minutes)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

clean:
	rm -rf newsclip-demo .pytest_cache
