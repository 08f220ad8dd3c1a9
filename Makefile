# vitlab: `make demo` sets everything up and runs the main job; `make test` runs the tests.
# Both create the virtual environment .venv on first use. Override PYTHON or TORCH on other machines,
# e.g. `make demo TORCH="torch torchvision"`.

PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean

demo: setup
	$(BIN)/vitlab compare

test: setup
	$(BIN)/python -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
