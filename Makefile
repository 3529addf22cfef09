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
	$(BIN)/ruff check deepcompress formats cli tests benchmarks fuzz

test: lint
	$(BIN)/pytest

demo: install
	$(BIN)/dcompress demo -o demo.dcz --force

RESULTS := benchmarks/results

bench: install
	$(BIN)/python benchmarks/codec.py --out $(RESULTS)/codec.json
	$(BIN)/python benchmarks/kmeans.py --out $(RESULTS)/kmeans.json
	for m in lenet300 lenet5; do \
	  $(BIN)/python benchmarks/prune.py --data-dir $(DATA) --model $$m --quiet --out $(RESULTS)/prune_$$m.json && \
	  $(BIN)/python benchmarks/table1.py --model $$m --data-dir $(DATA) --threads 1 --out $(RESULTS)/$$m.json --plot $(RESULTS)/inspect-$$m.png && \
	  $(BIN)/python benchmarks/table1.py --model $$m --data-dir $(DATA) --seeds 0,1,2 --threads 1 --out $(RESULTS)/table1-seeds-$$m.json && \
	  $(BIN)/python benchmarks/bits.py --model $$m --data-dir $(DATA) --out $(RESULTS)/bits-$$m.json || exit 1; \
	done
	$(BIN)/python benchmarks/plots.py --data-dir $(DATA) --out-dir $(RESULTS)
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) build dist *.egg-info
