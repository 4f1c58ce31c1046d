# Two commands on a fresh machine: `make run` (the bot) and `make test` (the suite, offline).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

run: install
	$(BIN)/python bot.py

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench.end_to_end --profile tiny --device cpu

clean:
	rm -rf $(VENV) .pytest_cache
