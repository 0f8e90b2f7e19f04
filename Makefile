# Two entry points on a fresh machine: `make demo` runs the quickstart job, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/runner: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

models/tiny.gguf: | $(BIN)/runner
	$(BIN)/runner make-tiny-model $@

data/quickstart: | $(BIN)/runner
	$(BIN)/python examples/make_prompts.py $@ --rows 2000 --shards 4

demo: $(BIN)/runner models/tiny.gguf data/quickstart
	$(BIN)/runner validate jobs/quickstart.yaml
	$(BIN)/runner submit jobs/quickstart.yaml
	$(BIN)/runner status jobs/quickstart.yaml
	$(BIN)/python examples/read_outputs.py out/quickstart

test: $(BIN)/runner
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/runner
	$(BIN)/python benchmarks/llamacpp_throughput.py $(BENCH_ARGS)

clean:
	rm -rf out data models
