# privrec: `make demo` and `make test` are all a newcomer needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
RUNS ?= runs
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup browser demo test test-other-cpu test-slow bench bench-avx2 bench-federated bench-unlearn bench-rank results-rank recipes fetch lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, in its own pip call (a CPU build; resolving it with the rest would pull a CUDA build)
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,federated]"
	touch $@

setup: $(VENV)/.installed

fetch: setup
	$(BIN)/privrec fetch

demo: fetch
	$(BIN)/privrec train configs/demo.yaml --out $(RUNS)/demo

# the browser test of privrec serve's page drives Debian's chromium through chromium-driver: installed here when
# missing and we are root (CI); elsewhere that one test skips and says why
browser:
	@if [ ! -x /usr/bin/chromedriver ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; fi

# the suite in TEST_WORKERS processes (pytest-xdist; a test file stays in one process, its fixtures with it):
# every tiny-model test trains on one thread, so one worker per core
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile

test: setup browser
	$(PYTEST)

# the suite again with `precision: auto` resolving as on the other CPU kind (bf16 autocast on an AVX2-only
# machine, fp32 on an AVX512-BF16 one); `pytest --cpu-bf16=yes|no` picks one kind by hand
test-other-cpu: setup browser
	$(PYTEST) --cpu-bf16=$$($(BIN)/python -c "import torch; \
	from privrec.model.backbone import supports_bf16; print('no' if supports_bf16(torch.device('cpu')) else 'yes')")

test-slow: fetch
	$(BIN)/python -m pytest -q -m slow

bench: fetch
	$(BIN)/python benchmarks/bench_core.py --out docs/benchmarks.md

# the same on this CPU with every kernel library kept to AVX2 and fp32 (benchmarks/isa.py; 3 min on 2 cores)
bench-avx2: fetch
	$(BIN)/python benchmarks/bench_core.py --emulate-avx2 --out docs/benchmarks.md

# the federated table and the split costs on SmolLM2 (87 min table on one core + 8 min split, measured)
bench-federated: fetch
	$(BIN)/python benchmarks/bench_federated.py all --runs $(RUNS)/federated

# the unlearning table (original, retrain, E2URec, NegGrad, Bad-Teacher on SmolLM2; ~50 min on one core, measured)
bench-unlearn: fetch
	$(BIN)/python benchmarks/bench_unlearn.py --results docs/results.md --benchmarks docs/benchmarks.md

# ranking throughput, shared-prefix vs full prompts at 10 and 100 candidates (4 min on 2 cores, measured)
bench-rank: fetch
	$(BIN)/python benchmarks/bench_rank.py --out docs/benchmarks.md

# the next-item ranking table (plain + shuffle+mask runs of configs/rank-ml100k.yaml; ~1 h per variant on one core)
results-rank: fetch
	$(BIN)/python benchmarks/results_rank.py --runs $(RUNS)/results-rank --out docs/results.md

# the recommendation-quality sweep (benchmarks/recipes.yaml, both protocols; ~10 h on 2 cores, estimated;
# resumable, and `python benchmarks/recipes.py --plan` prints each recipe's cost)
recipes: fetch
	$(BIN)/python benchmarks/recipes.py --runs $(RUNS)/recipes --out docs/results.md

# ruff, then the layering of ../shared/DESIGN.md ([tool.importlinter] in pyproject.toml: imports point down only)
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(RUNS)
