# The two commands: `make serve` runs the service, `make test` runs every test.
# Both set everything up on a fresh machine first (a virtualenv in .venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test install

serve: $(VENV)/.installed
	$(BIN)/imagine serve $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed

# torch first and pinned: it is the CPU wheel here and the CUDA build on a GPU
# box, and installing it before the rest keeps pip from choosing another.
$(VENV)/.installed: setup.cfg pyproject.toml
	@echo "Setting up $(VENV) (first run, or after a dependency change): about 2 minutes on a fresh machine, more to download a CUDA torch."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing torch 2.13.0 (the CPU wheel here, the CUDA build on a GPU box)..."
	$(BIN)/python -m pip install --quiet torch==2.13.0
	@echo "Installing imagine and its dependencies (diffusers, transformers, aiohttp, ...) and the test tools..."
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@echo "$(VENV) is ready."
	touch $@
