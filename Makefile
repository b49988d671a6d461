# The two commands of the README: `make demo` and `make test`. Both build the virtual
# environment first; torch is pinned to the CPU wheel so no multi-GB CUDA build is pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint docs dist bench mutate clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/torcheras demo

# In parallel over the machine's cores (pytest-xdist; `--dist loadgroup` from pyproject.toml
# sends each module whose tests share a costly subprocess fixture to one worker, before the
# single tests), every spawned process on one torch thread (tests/conftest.py).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The documentation site (MkDocs Material + mkdocstrings), strictly: a broken link or a
# docstring that names a missing parameter fails the build. Output: site/
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The wheel users install (pip install torcheras): dist/torcheras-*.whl
dist: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --wheel --outdir dist .

# The peers (Lightning, Keras 3, Ignite, Poutyne, skorch) come with the `bench` extra, torch pinned.
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,bench]" "$(TORCH_PIN)"
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/overhead.py --markdown
	$(PY) benchmarks/peers.py
	$(PY) benchmarks/async_save.py
	$(PY) benchmarks/instructions.py

# Mutation testing on model.py, logs.py, data.py and callbacks/ (slow: hours; not in CI).
mutate: $(VENV)/.installed
	PYTHON=$(abspath $(PY)) tools/mutate.sh

clean:
	rm -rf $(VENV) runs .pytest_cache site dist build
