# quantbench: every target bootstraps the virtualenv it needs (make install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONUNBUFFERED := 1
QB := $(VENV)/bin/quantbench
TASK ?= digits
# SWEEP=hard: the task's named grid conf/sweep/$(TASK)_hard.yaml (its own experiment, report and gate).
SWEEP ?=
GRID := $(if $(SWEEP),--grid $(SWEEP))
JOBS ?= 1
LAUNCHER ?=
ARGS ?=
# ENGINES=all (or a list: ENGINES=quantbench,ort): the engines a sweep / report / gate spans (conf/engine/).
ENGINES ?=
comma := ,
ALL_ENGINES := quantbench$(comma)ort$(comma)torchao$(comma)nncf$(comma)quark
ENGINE_ARG := $(if $(ENGINES),engine=$(if $(filter all,$(ENGINES)),$(ALL_ENGINES),$(ENGINES)))

.DEFAULT_GOAL := help
.PHONY: help install engines test test-slow lint bench clean-venv sweep report gate ui server

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: a range that admits a newer torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@# An editable install cannot ship the .pth file that applies the torchvision shim at interpreter start.
	$(PY) -m quantbench.compat --install-hook
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install quantbench (idempotent; reruns when pyproject/constraints change)

engines: $(STAMP) ## the isolated engines' virtualenvs (.engines/quark: AMD Quark, pinned in engines/quark/requirements.txt; idempotent)
	$(PY) -m quantbench.peers.venvs create quark

test: $(STAMP) ## fast test suite (CPU, under 4 minutes on two cores: one pytest-xdist worker per core, up to 4, longest files first)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test-slow: $(STAMP) ## slow end-to-end tests only
	$(PY) -m pytest -q -m slow

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check quantbench tasks tests

bench: $(STAMP) ## engine, deploy (onnxruntime + OpenVINO), fake-quant, export, QAT and CLI benchmarks -> reports/bench/*.md
	$(PY) -m quantbench.bench.deploy --out reports/bench/deploy.md
	$(PY) -m quantbench.bench.engine --out reports/bench/engine.md
	$(PY) -m quantbench.bench.qat --out reports/bench/qat.md
	$(PY) -m quantbench.bench.fakequant --out reports/bench/fakequant.md
	$(PY) -m quantbench.bench.export --out reports/bench/export.md
	$(PY) -m quantbench.bench.cli --out reports/bench/cli.md
	$(PY) -m quantbench.bench.zoo --out reports/bench/zoo.md

sweep: $(STAMP) ## models x schemes [x engines] of TASK into MLflow: make sweep TASK=digits [SWEEP=hard|engines] [ENGINES=all] [JOBS=2] [LAUNCHER=slurm] [ARGS="model=resnet18 scheme=ptq_pow2,qat_tqt"]
	$(QB) sweep $(TASK) $(GRID) --jobs $(JOBS) $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(ENGINE_ARG) $(ARGS)

report: $(STAMP) ## reports/TASK.md (SWEEP=hard: reports/TASK_hard.md) + plots + README table from the newest complete sweep: make report TASK=digits [SWEEP=hard] [ARGS="--sweep ID"]
	@# The README block is refreshed when README.md has one for TASK or TASK_SWEEP (digits, shapes, digits_hard,
	@# shapes_hard); `--readme=` cannot swallow an override of ARGS, and a --readme in ARGS comes later, so it wins.
	$(QB) report $(TASK) $(GRID) $(if $(shell grep -l 'quantbench:table:$(TASK)$(if $(SWEEP),_$(SWEEP)):start' README.md 2>/dev/null),--readme=README.md) $(ENGINE_ARG) $(ARGS)

gate: $(STAMP) ## accuracy gates (conf/gates/TASK.yaml; SWEEP=hard: TASK_hard.yaml) on the sweep a report reads; fails on a regression
	$(QB) gate $(TASK) $(GRID) $(ENGINE_ARG) $(ARGS)

ui: $(STAMP) ## MLflow UI on 127.0.0.1 against mlruns/ (prints the runs-table link; SWEEP=hard: the hard grid's)
	$(QB) ui --task $(TASK) $(GRID) $(ENGINE_ARG) $(ARGS)

server: $(STAMP) ## shared MLflow tracking server on 127.0.0.1:5001 (sqlite; ARGS="--backend-store-uri postgresql://...")
	$(QB) server $(ARGS)

clean-venv: ## remove the virtualenv
	rm -rf $(VENV)
