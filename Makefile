# Two entry points (see README): `make train` runs the bundle's training on the embedded default,
# `make test` runs the test suite. Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# MONAI Label 0.8.5 pins numpy 1.26 and jsonschema 3.2: it gets its own environment, used by its server test.
LABEL_VENV := .venv-label
LABEL_STAMP := $(LABEL_VENV)/.installed

.PHONY: venv venv-label train test base download clean

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

$(LABEL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(LABEL_VENV)/bin/python -m pip install -q torch torchvision
	$(LABEL_VENV)/bin/python -m pip install -q -e . "monailabel==0.8.5" "pydicom<3" "dicomweb-client<0.60" "pynetdicom<3"
	touch $(LABEL_STAMP)

venv: $(STAMP)

venv-label: $(LABEL_STAMP)

train: $(STAMP)
	$(PY) -m monai.bundle run training --config_file configs/train.yaml $(ARGS)

test: $(STAMP) $(LABEL_STAMP)
	$(PY) -m pytest $(ARGS)

# The intent-gap testbed's base (docs/testbed.md): prepare the training data (shared CoNSeP and CT beside the
# checkout, ../shared/data), then pretrain the `small` SAM on SAM's single-object objective, seeded (SEED), and
# write models/sam_small_base.pth. Run again to resume; delete models/pretraining/ to start afresh.
SHARED ?= ../shared/data
SEED ?= 0
data/consep/datalist.json: | $(STAMP)
	$(PY) scripts/prepare_consep.py --input $(SHARED)/consep --output data/consep --type_scheme 4 --seed $(SEED)
data/ct/datalist.json: | $(STAMP)
	$(PY) scripts/prepare_synapse.py --pair $(SHARED)/ct_totalsegmentator_example/example_ct_sm.nii.gz \
		$(SHARED)/ct_totalsegmentator_example/example_seg.nii.gz --label_mapping totalsegmentator --output data/ct
base: $(STAMP) data/consep/datalist.json data/ct/datalist.json
	$(PY) -m monai.bundle run pretraining --config_file "['configs/train.yaml','configs/pretrain.yaml']" \
		--seed $(SEED) $(ARGS)

# An official SAM checkpoint listed in large_files.yml (the only command that downloads anything).
MODEL ?= vit_b
download: $(STAMP)
	$(PY) scripts/download_checkpoint.py --model_size $(MODEL)

clean:
	rm -rf $(VENV) $(LABEL_VENV) eval models/checkpoint_*.pt
