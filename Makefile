# Everything runs in a project-local virtualenv that the targets create and fill themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision versions the project is tested with (pip installs them first; override with
# `make TORCH_SPEC=... test`).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint docs bench clean

$(BIN)/.installed: pyproject.toml Makefile requirements/testbed.txt requirements/testbed-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test,demo,docs,lint]"
	$(BIN)/python -m pip install -q --no-deps -r requirements/testbed-nodeps.txt
	$(BIN)/python -m pip install -q -r requirements/testbed.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/sparsegan demo --out demo-output

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.run_all --ngf 64 --ndf 64 --rounds 3

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check sparsegan tests benchmarks examples adapters
	$(BIN)/mypy

docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site build *.egg-info
