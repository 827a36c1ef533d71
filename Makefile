# Two commands do everything on a fresh machine:
#   make run    install, then run every stage of RIL on the built-in tiny task (CPU, a few minutes), and draw metrics.png
#   make test   install, then run the test suite
# Tools (not tests): make bench (a RIL step against the bare model calls it needs), make memory (estimated GPU memory of a
# Qwen2-VL-2B run), make paper-table (the paper's tables in miniature, 2 tasks x 3 seeds, about 60 minutes on 2 cores).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: run test bench memory paper-table clean

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt pytest
	touch $@

run: $(BIN)/.installed
	$(BIN)/python ril.py --out runs/ril --overwrite
	$(BIN)/python test_ril.py --plot runs/ril

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q test_ril.py

bench: $(BIN)/.installed
	$(BIN)/python test_ril.py --bench

memory: $(BIN)/.installed
	$(BIN)/python test_ril.py --memory

paper-table: $(BIN)/.installed
	$(BIN)/python test_ril.py --paper-table

clean:
	rm -rf runs .pytest_cache __pycache__
