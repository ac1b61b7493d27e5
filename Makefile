# torpor — the two commands are `make demo` and `make test` (see README.md).
# Everything they need is installed on first use: Python packages into a virtualenv and
# the Go-built tools (Kubernetes, etcd, MinIO, Helm), both cached outside the repository.

SHELL := /bin/bash
TORPOR_CACHE ?= $(HOME)/.cache/torpor
VENV ?= $(TORPOR_CACHE)/venv-py311
PYTHON ?= python3
PY := $(VENV)/bin/python
export TORPOR_CACHE
# The virtualenv is shared by every checkout on the machine (torch is 5 GB), so its editable
# install points at whichever checkout ran `make setup` last. This checkout's code comes
# first on the path for every command and every process they start (pods, operators).
export PYTHONPATH := $(CURDIR)/runtime:$(CURDIR)/operator$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help setup tools lint test test-unit demo cluster bench generate check-generated clean-cache

help:
	@echo "make demo   - run the local demo (control plane, node agent, MinIO)"
	@echo "make test   - install everything needed and run every test tier"
	@echo "make cluster - start a local control plane + nodes + MinIO until Ctrl-C"
	@echo "make bench  - run the benchmarks in bench/"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# pip is a no-op when everything is satisfied; torch comes from pip's own cache after the
# first install.
# `make bench` adds the benchmarks' baselines (the `bench` extra) in the same pip run; a
# target-specific value holds for the prerequisites it makes, so `setup` sees it.
EXTRAS ?= torch,operator,dev,lightning,transformers

setup: $(PY)
	@echo "[setup] python packages into $(VENV) ($(EXTRAS))"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"

tools: $(PY)
	$(PY) hack/bootstrap.py

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint --failure-threshold info Dockerfile examples/demo/Dockerfile
	$(PY) hack/generate.py --check

test: setup tools lint
	$(PY) -m pytest tests --durations=30

test-unit: setup
	$(PY) -m pytest tests/unit

demo: setup tools
	$(PY) hack/cluster.py --demo

cluster: setup tools
	$(PY) hack/cluster.py

bench: EXTRAS = torch,operator,dev,lightning,transformers,bench
bench: setup tools
	$(PY) bench/run.py

# The chart's CRD template, its copy of the RBAC rules, values.schema.json and the README's
# TrainingJob reference, from their one source each.
generate: setup
	$(PY) hack/generate.py

check-generated: setup
	$(PY) hack/generate.py --check

clean-cache:
	rm -rf $(TORPOR_CACHE)
