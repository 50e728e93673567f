# Two commands on a fresh machine with Python 3.11 (see README.md):
#   make run    install, then the whole PAD paradigm on the offline default (ml-100k, CPU);
#               make run PRESET=recipe: the recipe, beyond the paper (also trains the MoRec run it needs)
#   make test   install, then the test suite (what .ci/run calls)
#   make table  the SASRec vs PAD table of finished runs (of PRESET), nothing trained
# Variables: DATA (prepared dataset name), SEEDS (space-separated), DEVICE (cpu|cuda),
# PREPARE (extra flags for prepare_data.py, e.g. "--raw-dir raw/MIND --encoder llm2vec";
# changing them re-prepares), THREADS (threads per process), FORCE=1 (retrain finished runs),
# PRESET (none: the paper's configuration; recipe: the recipe, trainer.PRESETS).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ml-100k
SEEDS ?= 0
DEVICE ?= cpu
PREPARE ?=
THREADS ?=
FORCE ?=
PRESET ?= none
RUNS := runs/$(DATA)
$(if $(filter none recipe,$(PRESET)),,$(error PRESET=$(PRESET): none or recipe))
# each preset's phase-1 and phase-3 runs, as the scripts name them (runs.run_path), and their table labels
SASREC_RUN_none := pretrain_sasrec
PAD_RUN_none := finetune_sasrec_freq_id-align-llm_gaussian_rec_gamma0.1
LABELS_none := SASRec PAD
SASREC_RUN_recipe := pretrain_sasrec_ce_recipe
PAD_RUN_recipe := finetune_sasrec_freq-validonly_id-align-llm-text_gaussian_rec_gamma0.1_llm-morec_text-std-l0_ce_recipe
LABELS_recipe := SASRec-(CE) PAD-(recipe)
FLAGS := --data $(DATA) --device $(DEVICE) --preset $(PRESET) $(if $(THREADS),--threads $(THREADS)) $(if $(FORCE),--overwrite)
comma := ,
empty :=
space := $(empty) $(empty)
commas = $(subst $(space),$(comma),$(strip $(1)))

.PHONY: install run table test FORCE_CHECK

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $@

# the prepare flags are a file, rewritten only when they change: then dataset.pt is remade
data/$(DATA)/prepare.flags: FORCE_CHECK
	@mkdir -p $(@D)
	@echo '$(DATA) $(PREPARE)' | cmp -s - $@ || echo '$(DATA) $(PREPARE)' > $@

data/$(DATA)/dataset.pt: data/$(DATA)/prepare.flags | install
	$(BIN)/python prepare_data.py --data $(DATA) $(PREPARE)

# each script reuses a finished run with the same flags and data (FORCE=1 retrains)
run: install data/$(DATA)/dataset.pt
	set -e; for s in $(SEEDS); do \
	  $(BIN)/python pretrain.py $(FLAGS) --seed $$s; \
	  $(if $(filter recipe,$(PRESET)),$(BIN)/python baselines.py --method morec $(FLAGS) --seed $$s;) \
	  $(BIN)/python align.py $(FLAGS) --seed $$s; \
	  $(BIN)/python finetune.py $(FLAGS) --seed $$s; \
	done
	$(MAKE) --no-print-directory table

table:
	@$(BIN)/python evaluate.py --table \
	  "$(subst -, ,$(word 1,$(LABELS_$(PRESET))))=$(call commas,$(foreach s,$(SEEDS),$(RUNS)/$(SASREC_RUN_$(PRESET))_seed$(s).json))" \
	  "$(subst -, ,$(word 2,$(LABELS_$(PRESET))))=$(call commas,$(foreach s,$(SEEDS),$(RUNS)/$(PAD_RUN_$(PRESET))_seed$(s).json))"

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests
