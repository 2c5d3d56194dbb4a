# Set-up is part of each target: a virtualenv in .venv with domaingrad and its
# dependencies (torch, torchvision: about 5.5 GB, a few minutes the first time).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test bench install

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

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_train_loop.py
