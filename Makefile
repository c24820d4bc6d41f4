# Everything a fresh machine needs comes from here: `make demo` and `make test` create .venv,
# install pinned CPU torch (override TORCH_SPEC for another build) and the test extras, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.qlora_fast-installed
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test bench install wheel clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel ninja
	# torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q "$(TRITON_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qlora-fast finetune

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python -m pytest bench/bench_*.py --benchmark-only -q

wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation . -w dist/

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
