# Set-up and checks. Everything installs into .venv; nothing global is touched.
# GPU users: `make demo CONSTRAINTS=my-constraints.txt` (or CONSTRAINTS=/dev/null) to take
# another torch build than the pinned CPU wheel.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c $(CONSTRAINTS)

.PHONY: demo test test-slow bench clean device-wheels

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m kinema.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed-test
	$(PY) bench/load_memory.py

# Wheels the GPU machine's image lacks, for scripts/device_train.sh (carried there as .whl/).
device-wheels:
	$(PYTHON) -m pip download -q --no-deps -d .whl ftfy wcwidth

clean:
	rm -rf $(VENV) outputs .pytest_cache
