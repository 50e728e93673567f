# Two commands on a fresh machine with Python 3.11 (see README.md):
#   make run    install, then the whole PAD paradigm on the offline default (ml-100k, CPU)
#   make test   install, then the test suite (what .ci/run calls)
# Variables: DATA (prepared dataset name), SEEDS (space-separated), DEVICE (cpu|cuda),
# PREPARE (extra flags for prepare_data.py, e.g. "--raw-dir raw/MIND --encoder llm2vec").
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ml-100k
SEEDS ?= 0
DEVICE ?= cpu
PREPARE ?=
RUNS := runs/$(DATA)
PAD_RUN := finetune_sasrec_freq_id-align-llm
comma := ,
empty :=
space := $(empty) $(empty)
commas = $(subst $(space),$(comma),$(strip $(1)))

.PHONY: install run test

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $@

data/$(DATA)/dataset.pt: | install
	$(BIN)/python prepare_data.py --data $(DATA) $(PREPARE)

run: install data/$(DATA)/dataset.pt
	set -e; for s in $(SEEDS); do \
	  $(BIN)/python pretrain.py --data $(DATA) --seed $$s --device $(DEVICE); \
	  $(BIN)/python align.py --data $(DATA) --gamma 0.1 --seed $$s --device $(DEVICE); \
	  $(BIN)/python finetune.py --data $(DATA) --seed $$s --device $(DEVICE); \
	done
	$(BIN)/python evaluate.py --table \
	  "SASRec=$(call commas,$(foreach s,$(SEEDS),$(RUNS)/pretrain_sasrec_seed$(s).json))" \
	  "PAD=$(call commas,$(foreach s,$(SEEDS),$(RUNS)/$(PAD_RUN)_seed$(s).json))"

test: install
	$(BIN)/python -m pytest -q tests
