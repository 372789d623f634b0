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

test: $(VENV)/.installed-test browser
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed-test
	$(PY) bench/load_memory.py

# -- the browser tests/test_web_page.py drives: Debian's chromium, installed when missing and run as root
# (playwright comes with the test extras; `playwright install` needs a CDN, so the system browser is used).
# Without one the page test is skipped and says why; set KINEMA_CHROMIUM to use another Chromium.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for tests/test_web_page.py (apt-get)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)) >/dev/null 2>&1 || \
	  echo "apt-get could not install chromium: tests/test_web_page.py will be skipped"; \
	else \
	  echo "no chromium and not root: tests/test_web_page.py will be skipped (sudo apt-get install chromium)"; \
	fi
# -- end of the browser block

# Wheels the GPU machine's image lacks, for scripts/device_train.sh (carried there as .whl/).
device-wheels:
	$(PYTHON) -m pip download -q --no-deps -d .whl ftfy wcwidth

clean:
	rm -rf $(VENV) outputs .pytest_cache
