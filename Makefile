# `make demo` and `make test` create .venv on first use and install requirements.txt into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: demo lint test venv clean

venv: $(STAMP)

# DeepSpeed builds from an sdist that imports torch, so it is installed after torch, in the same venv.
$(STAMP): requirements.txt requirements-deepspeed.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -r requirements-deepspeed.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The whole pipeline on built-in synthetic CT phantoms, a few minutes on 2 CPU cores:
# write NIfTI phantoms, cache them in sharded HDF5, pretrain a 3D MAE from the cache.
demo: $(STAMP)
	$(PY) -m datasets.phantoms --output demo_output/phantoms --count 24
	$(PY) -m datasets.build_cache --input demo_output/phantoms --output demo_output/cache --size 64 --workers 2
	$(PY) main_pretrain.py --data_path demo_output/cache --model mae_vit_tiny_patch16 --input_size 64 \
		--patch_size 8 --batch_size 4 --epochs 30 --warmup_epochs 3 --lr 1.5e-3 --num_workers 2 \
		--log_every 6 --vis_every 60 --keep_every 0 --output_dir demo_output/pretrain

# Layering (import-linter contracts in pyproject.toml) and lint (ruff) first: they take seconds.
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf demo_output .pytest_cache
