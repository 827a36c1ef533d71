# Two commands do everything on a fresh machine:
#   make run    install, then Dr.GRPO and RIL from one Stage 0 start on the built-in regime task (CPU, ~4 minutes)
#   make test   install, then check the formatting and lint (make lint) and run the test suite
# Tools, not tests (tools/): make bench (a RIL step against the bare model calls it needs), make memory (ril.py's GPU
# memory plan of the README's real-model commands), make paper-table (the paper's tables in miniature, ~90 minutes).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: run test lint bench memory paper-table clean

$(BIN)/.installed: requirements.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt pytest ruff==0.17.6
	touch $@

# make run: the paper's regime in miniature (--data transfer). Stage 0 once (runs/start: the toy task's skills), then
# from it, at once, one thread each: Dr.GRPO, the paper's RIL (Eq. 2) and RIL with its two variant flags, all at Stage
# 0's peak learning rate (--lr 3e-3: at the default 2e-4, 200 steps of imitation learn nothing here); then the table.
RL_RUN := OMP_NUM_THREADS=1 $(BIN)/python ril.py --data transfer --student runs/start --sft-steps 0 --lr 3e-3 --overwrite
run: $(BIN)/.installed
	$(BIN)/python ril.py --data transfer --algo dr_grpo --steps 0 --out runs/start --overwrite
	$(RL_RUN) --algo dr_grpo --out runs/dr_grpo > runs/dr_grpo.log 2>&1 & a=$$!; \
	$(RL_RUN) --baseline student --sim-reward continuous --out runs/ril_variants > runs/ril_variants.log 2>&1 & b=$$!; \
	$(RL_RUN) --out runs/ril && wait $$a && wait $$b
	$(BIN)/python tools/compare.py runs/start runs/dr_grpo runs/ril runs/ril_variants
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
