# Two commands do all the set-up on a fresh machine:
#   make demo   - bootstrap .venv, then run the demo on the embedded default (local Ray, MLflow sqlite
#                 under the user data directory, procedural data)
#   make test   - bootstrap .venv, then run the test suite (every test; its 15 slowest are listed)
#   make test-fast - the tests that start no server, cluster or browser (minutes, for every change)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench-quick install clean-venv

install: $(STAMP)

# torch first, the CPU build this machine has (2.13.0); the project asks only torch>=2.5, so the install
# below keeps it (and a GPU machine's own CUDA build where one is installed).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo sweep on a local Ray (no address: started for the run), tracked in the default MLflow store
# (sqlite under the user data directory): the paper's comparison at beta = 4, 2 seeds per family; then the
# top-2 table and the family comparison; last, where the sweep's study report is and the URL of the runs
# table (once the MLflow UI runs).
demo: $(STAMP)
	$(BIN)/python sweeps/full_grid.py --preset demo --experiment demo --name demo
	$(BIN)/python -m analysis top3 --experiment demo --sweep demo --k 2
	$(BIN)/python -m analysis compare --experiment demo --sweep demo --k 2
	@$(BIN)/python -c "from provlae.paths import default_tracking_uri as u; \
	print('Figures: each run holds the paper figures as artifacts, figures/stage<s>/ at every stage end'); \
	print(f'Compare the runs in the MLflow UI: $(BIN)/mlflow ui --backend-store-uri {u()} --host 127.0.0.1')"
	@$(BIN)/python -c "from sweeps.launch import report_lines; \
	print(*report_lines('demo', 'demo'), sep='\n')"

# make test: three workers on the two cores, each taking whole files (a file's servers and trained models
# are set up once), the longest files first (tests/durations.py): a worker that waits (on a server, a
# stopped trial, a process it started) leaves its core to the others, and the workers finish together.
# make test-fast: whole files, longest first, in two workers (sharing out the tests one by one set up a
# file's trained models in both; a third worker only adds contention: these tests do not wait).
# The measured times against the other ways: README.md, Tests.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 -m "not slow"

bench-quick: $(STAMP)
	for b in benchmarks/*.py; do case $$b in */_*) continue;; esac; $(BIN)/python $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)
