# `make demo` and `make test` create .venv on first use and install requirements.txt into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

# A real 3D MAE pretraining on built-in synthetic CT phantoms: a few minutes on 2 CPU cores.
demo: $(STAMP)
	$(PY) main_pretrain.py --model mae_vit_tiny_patch16 --input_size 64 --patch_size 8 \
		--batch_size 4 --epochs 30 --warmup_epochs 3 --lr 1.5e-3 --num_workers 2 \
		--log_every 6 --vis_every 60 --keep_every 0 --output_dir demo_output

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf demo_output .pytest_cache
