# Two commands do all the set-up on a fresh machine:
#   make demo   - bootstrap .venv, then run the demo on the embedded default (local Ray, MLflow sqlite
#                 under the user data directory, procedural data)
#   make test   - bootstrap .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-quick install clean-venv

install: $(STAMP)

# torch first: 2.13.0 is pinned, so the project install below adds nothing to it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m provlae train --set family=pro_vlae --set dataset=dsprites --set subset=5000 \
	  --set steps_per_stage=300 --set batch_size=64 --set fade_in_steps=150 --set mi_samples=1000 \
	  --set factor_train_votes=500 --set factor_eval_votes=300 --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-quick: $(STAMP)
	for b in benchmarks/*.py; do case $$b in */_*) continue;; esac; $(BIN)/python $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)
