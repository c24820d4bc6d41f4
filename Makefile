# Everything a fresh machine needs comes from here: `make demo` and `make test` create .venv,
# install pinned CPU torch (override TORCH_SPEC for another build) and the test extras, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.qlora_fast-installed
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test bench install wheel clean aot aot36 lint

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

# Lint gate (ruff, configured in pyproject.toml): pyflakes, import order, 120-character lines.
lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(STAMP)
	$(BIN)/python -m pytest bench/bench_*.py --benchmark-only -q

# AOT compile gate: every kernel specialization compiled for sm_80/sm_90 on the CPU (bench/aot_compile.py).
aot: $(STAMP)
	$(BIN)/python bench/aot_compile.py

# The same gate (--quick, sm_90) under triton 3.6, the GPU image's version: a compile-only copy of
# the triton wheel (no deps, torch untouched) in $(TRITON36), put first on PYTHONPATH.
TRITON36 := $(VENV)/triton-3.6.0
$(TRITON36)/.installed:
	$(BIN)/python -m pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

aot36: $(STAMP) $(TRITON36)/.installed
	PYTHONPATH=$(abspath $(TRITON36)) $(BIN)/python bench/aot_compile.py --quick --arch 90

wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation . -w dist/

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
