# The two commands the README opens with:
#   make demo   - create .venv, install FedCT, simulate a federation of synthetic hospitals
#   make test   - create/update .venv and run the whole test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
INSTALLED := $(VENV)/.fedct-installed
OUT ?= fedct-output

.PHONY: demo test test-fast lint install proxy clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "FedCT needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/fedct simulate --out $(OUT)

# `fedct server` puts nginx in front of the SuperLink (server/fleet_proxy.py) and the deployment
# tests start real ones: as root on Debian/Ubuntu it comes from the OS packages (not started as a
# service: FedCT starts its own), otherwise this says what to install.
proxy:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || bash .ci/install-nginx

test: $(INSTALLED) proxy
	$(VENV)/bin/python -m pytest

test-fast: $(INSTALLED) proxy
	$(VENV)/bin/python -m pytest -m "not slow"

# mypy cannot follow setuptools' package-dir mapping: it checks the fedct namespace through a
# folder of links (.mypy-src/fedct/common -> common, ...)
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	rm -rf .mypy-src && mkdir -p .mypy-src/fedct
	for p in common client server simulations; do ln -s ../../$$p .mypy-src/fedct/$$p; done
	cd .mypy-src && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p fedct.common -p fedct.client -p fedct.server -p fedct.simulations

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache .mypy-src
