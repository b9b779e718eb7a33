# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install zooscan (tested pins), run `zooscan demo` offline
#   make test   create .venv, install zooscan + test tools, run the test suite and ruff
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt tests/plugin_example/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[hub,test]" -e tests/plugin_example
	touch $@

.PHONY: install demo test lint bench clean
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/zooscan demo

test: $(VENV)/.installed
	$(BIN)/ruff check zooscan plugins tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) zooscan-demo .pytest_cache
