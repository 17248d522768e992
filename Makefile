# The two quick-start commands: `make demo` and `make test`. Both create .venv and install what they need first.
# Every install goes through constraints.txt, which pins torch so that a CPU machine never downloads CUDA packages.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.install-stamp

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/grpo-image train recipes/tiny_cpu.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
