# The two commands of the README. Everything runs inside ./.venv, created by scripts/setup.sh.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-dev demo test bench

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

## demo: set up, then run the pipeline (dvc repro) on the embedded synthetic cohort
demo: setup
	dvc repro
	@echo; medtl summary

## test: set up with test dependencies, then run the whole test suite
test: setup-dev
	python -m pytest -n 2 --dist loadgroup

bench: setup-dev
	python benchmarks/bench_ingest.py
	python benchmarks/bench_preprocess.py
