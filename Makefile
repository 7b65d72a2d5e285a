# Quick start: `make demo` (headline experiment) and `make test` (test suite).
# Both create .venv if it is missing and install the package into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench reproduce clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m medfed_jax --config=configs/heart_fedavg.py --workdir=runs/heart_demo --seeds=5 --overwrite

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check --config .ci/ruff.toml medfed_jax tests benchmarks configs
	$(VENV)/bin/ruff format --config .ci/ruff.toml --check medfed_jax tests benchmarks configs

format: $(STAMP)
	$(VENV)/bin/ruff format --config .ci/ruff.toml medfed_jax tests benchmarks configs
	$(VENV)/bin/ruff check --config .ci/ruff.toml --fix medfed_jax tests benchmarks configs

bench: $(STAMP)
	$(PY) benchmarks/round_throughput.py

# The README's Results section from scratch: collaboration (local-only vs federated vs pooled), security
# (25% sign flip, mean vs median) and privacy-utility sweeps, 5 seeds each, their reports, then the section.
REPRO := runs/reproduce
REPRO_SWEEPS := collaboration signflip_attack privacy_utility
reproduce: $(STAMP)
	rm -rf $(REPRO)
	start=$$(date +%s) && \
	for name in $(REPRO_SWEEPS); do \
	  $(PY) -m medfed_jax --config=configs/$$name.py --workdir=$(REPRO)/$$name || exit 1; \
	done && \
	$(PY) -m medfed_jax.report $(foreach name,$(REPRO_SWEEPS),--workdir=$(REPRO)/$(name)) \
	  --readme=README.md --assets=benchmarks/figures --command="make reproduce" --wall_seconds=$$(( $$(date +%s) - start ))

clean:
	rm -rf runs build *.egg-info .pytest_cache
