# The two commands of the README. Everything runs inside ./.venv, created by scripts/setup.sh.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-dev demo demo-more demo-pacs study test bench

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

## demo: set up, then run the retraining flow (Prefect; every stage through DVC, then promote and
## push) on the embedded synthetic cohort, and print what came out
demo: setup
	medtl retrain
	@echo; medtl summary

## demo-more: 20 new synthetic patients arrive; the flow ingests only the new files, retrains and decides
demo-more: setup
	medtl synth --out data/raw/synth --add 20
	medtl retrain
	@echo; medtl summary

## demo-pacs: a real PACS as source and destination: a local Orthanc (Debian's orthanc + orthanc-dicomweb,
## installed where apt and root are) holding the synthetic cohort; the retrain flow pulls from it, and
## predict --pacs stores one SR into each study
demo-pacs:
	MEDTL_WITH_ORTHANC=1 scripts/setup.sh
	scripts/demo_pacs.sh

## study: set up, then the transfer-learning study (strategy x data fraction, DVC experiments) on the
## synthetic cohort: reports/study.md with figures and findings (grid: params study.grids.cpu)
study: setup
	medtl study

## test: set up with test dependencies, then run the whole test suite
test: setup-dev
	python -m pytest -n 2 --dist loadgroup

bench: setup-dev
	python benchmarks/bench_ingest.py
	python benchmarks/bench_preprocess.py
