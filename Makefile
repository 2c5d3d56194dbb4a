# Set-up is part of each target: a virtualenv in .venv with domaingrad and its
# dependencies (torch, torchvision: about 5.5 GB, a few minutes the first time).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test check test-clusters docs bench install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: ERM on Colored MNIST (embedded digits), test environment -90%.
demo: $(STAMP)
	$(VENV)/bin/domaingrad train --dataset ColoredMNIST --algorithm ERM --test-envs 2 \
		--steps 201 --checkpoint-freq 100 --output-dir $(DEMO_DIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The quality gate CI runs: lint, format, types, the docstring examples, then the tests.
check: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts docs/_ext
	$(VENV)/bin/ruff format --check src tests benchmarks scripts docs/_ext
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q --doctest-modules src/domaingrad/gradients
	$(VENV)/bin/python -m pytest -q -m "not clusters"

# Real clusters on this machine: a two-node Ray cluster the tests start and stop, and the
# single-node Slurm cluster of scripts/start_slurm.sh (started if needed; skipped when Slurm
# is not installed). .ci/run installs Slurm (as root) and runs this after make check.
test-clusters: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m clusters tests/sweep/test_clusters.py

DOCS_STAMP := $(VENV)/.docs-installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# The docs extra (MkDocs, mkdocstrings) on top of the dev install; rebuilt with pyproject.toml.
$(DOCS_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[dev,docs]'
	rm -f $(VENV)/.docs-installed-*
	touch $@

# The documentation site (user guide + API reference from the docstrings) in site/:
# open site/index.html in a browser. Every MkDocs warning is an error.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
	$(VENV)/bin/python scripts/check_docs_site.py site
	@echo "documentation: open site/index.html in a browser"

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_train_loop.py
