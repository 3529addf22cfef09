PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/mnist

.PHONY: install test lint demo bench clean

$(BIN)/dcompress: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,plot]'
	touch $(BIN)/dcompress

install: $(BIN)/dcompress

lint: install
	$(BIN)/ruff check deepcompress formats cli tests benchmarks

test: lint
	$(BIN)/pytest

demo: install
	$(BIN)/dcompress demo

bench: install
	$(BIN)/python benchmarks/codec.py --out benchmarks/results/codec.json

clean:
	rm -rf $(VENV) build dist *.egg-info
