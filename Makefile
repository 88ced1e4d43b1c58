# Quick start: `make demo` runs the main job, `make test` runs the test suite. Each creates the
# virtualenv it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "msa-jax needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[interop,test]'
	touch $@ $(VENV)/.core

# The main job: the training-path forward of the shipped tiny MSA checkpoint on a packed batch,
# checked against the official PyTorch implementation's outputs for the same batch.
demo: $(VENV)/.core
	$(BIN)/msa-jax forward --checkpoint tests/data/official_msa_tiny/ckpt \
	  --batch tests/data/official_msa_tiny/fixture.npz --output out/demo_forward.npz \
	  --reference tests/data/official_msa_tiny/fixture.npz

# Exit status: pytest's, except that "no tests collected" (5) is a failure too.
test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) out .pytest_cache
