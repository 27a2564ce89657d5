# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench install clean browser

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Debian's chromium for tests/test_app_browser.py: nothing to do when present; installed with
# apt-get as root; never fails (without it that one test is skipped, with the reason).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) \
	    || echo "make browser: chromium could not be installed; the browser test will be skipped"; \
	else echo "make browser: no /usr/bin/chromium and no root apt-get; the browser test will be skipped"; fi

test: $(STAMP) browser
	$(PY) -m pytest

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/run_all.sh

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo-out
