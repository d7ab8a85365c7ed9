# The two set-up commands of the README: `make demo` and `make test`.
# Each installs what it needs first (torch 2.13.0 CPU before the project, so pip
# never pulls a CUDA build), then runs.
PY ?= python3
RUN ?= runs/demo

.PHONY: install demo test bench docs

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(PY) -m pyrovi.cli train --data digits --latent-dim 8 --hidden 256 --epochs 60 --objective elbo \
		--out $(RUN) --overwrite --evaluate-k 1000 --no-progress
	$(PY) -m pyrovi.cli sample $(RUN) --n 64 --out $(RUN)/samples.png
	$(PY) -m pyrovi.cli diagnose $(RUN)
	@echo "report: $(RUN)/report.md and $(RUN)/report.html"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks

docs: install
	$(PY) -m mkdocs build --strict
