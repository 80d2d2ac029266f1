# `make test` and `make demo` set up everything on a fresh machine: .venv is created on first use.
# On the GPU machine (no registry), `make test-gpu` and `make bench-gpu` use the installed python.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSPY  ?= python3
HAS_GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERP  = $(if $(filter 1,$(HAS_GPU)),,TRITON_INTERPRET=1)

.PHONY: install test test-gpu bench bench-gpu demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,liger]"
	touch $(STAMP)

test: $(STAMP)
	$(INTERP) $(PY) -m pytest -q tests

test-gpu:
	PYTHONPATH=$(CURDIR) $(SYSPY) -m pytest -q -m gpu tests

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-columns=median,iqr,rounds --benchmark-sort=fullname

bench-gpu:
	PYTHONPATH=$(CURDIR) $(SYSPY) -m pytest -q bench --benchmark-columns=median,iqr,rounds

demo: $(STAMP)
	$(INTERP) $(PY) examples/grpo_loss_demo.py

lint: $(STAMP)
	$(PY) -m ruff check gxpo_kernels trainer bench tests examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
