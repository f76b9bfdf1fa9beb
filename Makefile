# `make test` and `make demo` work on a fresh machine: they create .venv and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATIVE_SOURCES := $(wildcard cuda_ops/*.cpp cuda_ops/*.cu cuda_ops/*.h)

.PHONY: install test test-fast demo bench check-cuda clean

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

# compile-only check of cuda_ops/*.cu with nvcc from pip wheels (no GPU needed; not part of `make test`)
check-cuda: $(STAMP)
	bash scripts/check_cuda_compile.sh

clean:
	rm -rf build *.egg-info lightning_sparse/*.so lightning_logs outputs
