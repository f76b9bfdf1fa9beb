# `make test` and `make demo` work on a fresh machine: they create .venv and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATIVE_SOURCES := $(wildcard cuda_ops/*.cpp cuda_ops/*.cu cuda_ops/*.h)

.PHONY: install test demo bench check lint typecheck docs format check-cuda clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py scripts/setup_env.sh $(NATIVE_SOURCES)
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

demo: $(STAMP)
	$(VENV)/bin/lightning-sparse fit --config examples/dlrm.yaml

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

# What .ci/run checks before the tests; each step fails on a finding.
check: lint typecheck docs

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(NATIVE_SOURCES)

typecheck: $(STAMP)
	$(VENV)/bin/mypy  # the files: [tool.mypy] in pyproject.toml

# The documentation site (docs/, mkdocs.yml) into site/; warnings are errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Rewrites the tree in the house style (what `make lint` checks).
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(NATIVE_SOURCES)

# compile-only check of cuda_ops/*.cu with nvcc from pip wheels (no GPU needed; not part of `make test`)
check-cuda: $(STAMP)
	bash scripts/check_cuda_compile.sh

clean:
	rm -rf build dist site *.egg-info lightning_sparse/*.so lightning_logs outputs
