# One command each on a fresh machine: `make demo` (set up .venv, run the demo job), `make test` (set up, run tests).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Python caches what it compiles (.pyc in .venv and newsclip/) even where PYTHONDONTWRITEBYTECODE=1, as on the
# CI machine: there every process and Ray worker compiled torch, ray and pyarrow from source again (importing them
# took 18 s instead of 9.7 s, and a clean-clone CI run 10-12 min instead of 7.5, measured). Compiling on first import
# costs less than compiling all of .venv at install (uv --compile-bytecode: 47-77 s here).
CACHED := env -u PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "uv==0.13.9"
	# uv installs what pip would, from where pip would (.ci/uv_env.py reads pip's configuration), about twice as fast;
	# like `pip install --no-compile`, it leaves Python to compile what is imported when it is first imported
	eval "$$($(BIN)/python .ci/uv_env.py)" && $(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# one line per stage, then the metrics table; `make demo DEMO_ARGS=--verbose` for every message and Ray's own logs
demo: setup
	@$(CACHED) $(BIN)/newsclip demo $(DEMO_ARGS)

test: setup
	$(BIN)/ruff check newsclip tests benchmarks jobs cluster
	$(CACHED) $(BIN)/python -m pytest -q --durations=15

# the `not slow` subset: no whole job, no model trained (about 2 minutes)
test-fast: setup
	$(CACHED) $(BIN)/python -m pytest -q -m "not slow" --durations=10

clean:
	rm -rf newsclip-demo .pytest_cache
