# Two commands do everything on a fresh machine:
#   make run    install, then run every stage of RIL on the built-in tiny task (CPU, a few minutes), and draw metrics.png
#   make test   install, then check the formatting and lint (make lint) and run the test suite
# Tools, not tests (tools/): make bench (a RIL step against the bare model calls it needs), make memory (estimated GPU
# memory of a Qwen2-VL-2B run), make paper-table (the paper's tables in miniature, 2 tasks x 3 seeds, about 50 minutes).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: run test lint bench memory paper-table clean

$(BIN)/.installed: requirements.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt pytest ruff==0.17.6
	touch $@

run: $(BIN)/.installed
	$(BIN)/python ril.py --out runs/ril --overwrite
	$(BIN)/python tools/plot.py runs/ril

lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q test_ril.py

bench: $(BIN)/.installed
	$(BIN)/python tools/bench.py

memory: $(BIN)/.installed
	$(BIN)/python tools/bench.py --memory

paper-table: $(BIN)/.installed
	$(BIN)/python tools/paper_table.py

clean:
	rm -rf runs .pytest_cache __pycache__
