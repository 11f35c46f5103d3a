# Two entry points (see README): `make train` runs the bundle's training on the embedded default,
# `make test` runs the test suite. Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv train test download clean

# Nothing may reach the network on its own: no MLflow telemetry, no model-hub look-ups.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(PY) -m monai.bundle run training --config_file configs/train.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# An official SAM checkpoint listed in large_files.yml (the only command that downloads anything).
MODEL ?= vit_b
download: $(STAMP)
	$(PY) scripts/download_checkpoint.py --model_size $(MODEL)

clean:
	rm -rf $(VENV) eval models/checkpoint_*.pt
