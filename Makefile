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

# The main job: the shipped demo model over a memory of about 1M tokens of generated haystack
# (and a 16K one, with the dense and RAG baselines beside it): needle questions, accuracy,
# recall, latency, and a plot in out/niah_demo/niah.png.
demo: $(VENV)/.core
	$(BIN)/python experiments/niah.py --sizes=16K,1M --per_task=2 --dense_max=16K \
	  --dense_per_task=1 --rag_k=5 --workdir=out/niah_demo

# Exit status: pytest's, except that "no tests collected" (5) is a failure too.
test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) out .pytest_cache
