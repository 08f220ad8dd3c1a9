# vitlab: `make demo` sets everything up and runs the main job; `make test` runs the tests.
# Both create the virtual environment .venv on first use. Override PYTHON or TORCH on other machines,
# e.g. `make demo TORCH="torch torchvision"`.

PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test docs setup clean

demo: setup
	$(BIN)/vitlab compare

# The tests, and the checks CI runs with them: the layer contract (import-linter, in pyproject.toml),
# ruff, and the documentation built in strict mode (a broken reference fails).
test: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q

docs: setup
	$(BIN)/mkdocs serve

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache build
