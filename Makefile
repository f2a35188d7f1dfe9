# `make demo` and `make test` create .venv on first use. `make venv` installs VolMAE and its runtime
# requirements (requirements.txt); `make test` adds the test and lint tools (the `dev` extra).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo lint test test-fast venv clean

venv: $(STAMP)

# DeepSpeed builds from an sdist that imports torch, so it is installed after torch, in the same venv.
$(STAMP): requirements.txt requirements-deepspeed.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -r requirements-deepspeed.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[dev,export]"
	touch $(DEV_STAMP)

# The whole pipeline on built-in synthetic CT phantoms, about 4 minutes on 2 CPU cores: labelled NIfTI
# phantoms, an HDF5 cache, MAE pretraining, fine-tuning from its encoder, predictions with explanations.
demo: $(STAMP)
	VOLMAE_PYTHON=$(PY) launch/recipes/demo.sh --output_dir demo_output

# Layering (import-linter contracts in pyproject.toml) and lint (ruff) first: they take seconds.
lint: $(DEV_STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

# Most tests run a command with one thread and wait on it, so two pytest workers keep both cores busy.
# A file's tests run on one worker (--dist loadfile), which builds its module fixtures once. TEST_WORKERS=0
# runs them all in one process, in order.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The in-process tests alone (marked `fast`: no command started), for a quick check while editing
test-fast: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m fast tests

clean:
	rm -rf demo_output .pytest_cache
