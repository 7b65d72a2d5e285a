# Quick start: `make demo` (headline experiment) and `make test` (test suite).
# Both create .venv if it is missing and install the package into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench reproduce readme frontier clean

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
# (25% sign flip at scales 1, 2, 4; IID and Dirichlet; 100 and 300 rounds), client-level and record-level
# privacy-utility, and personalisation sweeps, 5 seeds each (each seed its own split), reports and figures.
# `make reproduce` writes the section to $(REPRO)/results_section.md (figures under $(REPRO)/figures) and
# leaves the tracked README.md alone; `make readme` (or `make reproduce README=1`) then rewrites README.md's
# Results section from those runs, figures copied under benchmarks/figures.
REPRO := runs/reproduce
REPRO_SWEEPS := collaboration signflip_attack privacy_utility record_dp personalization
REPORT := $(PY) -m medfed_jax.report $(foreach name,$(REPRO_SWEEPS),--workdir=$(REPRO)/$(name)) --command="make reproduce"
reproduce: $(STAMP)
	rm -rf $(REPRO)
	start=$$(date +%s) && \
	for name in $(REPRO_SWEEPS); do \
	  $(PY) -m medfed_jax --config=configs/$$name.py --workdir=$(REPRO)/$$name || exit 1; \
	done && \
	echo $$(( $$(date +%s) - start )) > $(REPRO)/wall_seconds
	$(REPORT) --wall_seconds=$$(cat $(REPRO)/wall_seconds) --section=$(REPRO)/results_section.md --assets=$(REPRO)/figures
	$(if $(README),$(MAKE) readme,@echo "README.md unchanged: run 'make readme' to put this section into it.")

readme: $(STAMP)
	@test -f $(REPRO)/wall_seconds || { echo "error: no finished 'make reproduce' in $(REPRO): run it first." >&2; exit 2; }
	$(REPORT) --wall_seconds=$$(cat $(REPRO)/wall_seconds) --readme=README.md --assets=benchmarks/figures

# The README's experiments of section "Unreliable clients, drift corrections, compressed uploads" from scratch:
# the sweeps configs/utility_frontier.py, compression_frontier.py and fedbuff_frontier.py into $(FRONTIER)/<sweep>
# (wall seconds in $(FRONTIER)/<sweep>.wall_s), then benchmarks/frontier.py: the tables, printed and written with
# the figure links to $(FRONTIER)/frontier.md, and the figures benchmarks/figures/frontier_{rounds,bytes,async}.png.
FRONTIER := runs/frontier
FRONTIER_SWEEPS := utility_frontier compression_frontier fedbuff_frontier
frontier: $(STAMP)
	rm -rf $(FRONTIER)
	for name in $(FRONTIER_SWEEPS); do \
	  start=$$(date +%s) && \
	  $(PY) -m medfed_jax --config=configs/$$name.py --workdir=$(FRONTIER)/$$name || exit 1; \
	  echo $$(( $$(date +%s) - start )) > $(FRONTIER)/$$name.wall_s; \
	done
	$(PY) benchmarks/frontier.py --workdir=$(FRONTIER) --figures=benchmarks/figures

clean:
	rm -rf runs build *.egg-info .pytest_cache
