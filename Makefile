# One command each on a fresh machine: `make demo` (set up .venv, run the demo job), `make test` (set up, run tests).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools<82" wheel
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/newsclip demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf newsclip-demo .pytest_cache
