# posttrain — make install | train | test | lint | format | tensorboard | bench | readme | clean
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# One pytest-xdist worker per core (at most 4: each holds torch in memory); a file's tests stay
# on one worker so its module fixtures (a trained run several tests read) are built once.
TEST_WORKERS ?= -n auto --maxprocesses=4 --dist loadfile

.PHONY: install train eval test test-fast lint format tensorboard bench readme clean

# Virtualenv + pinned install; redone only when the pins or the package metadata change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: install  ## the embedded default (digits, small CNN); extra overrides: make train ARGS="model=resnet18"
	$(PY) train.py $(ARGS)

eval: install  ## make eval ARGS="ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt"
	$(PY) eval.py $(ARGS)

test: install  ## the whole suite, slow CLI tests included
	$(PY) -m pytest $(TEST_WORKERS) --durations=15 $(ARGS)

test-fast: install
	$(PY) -m pytest $(TEST_WORKERS) -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs

bench: install
	$(PY) -m benchmarks $(ARGS)

readme: install  ## re-render README's results tables from benchmarks/results/*.json
	$(PY) -m benchmarks.readme

clean:
	rm -rf outputs/*/ .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
