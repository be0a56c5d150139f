# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create (once) and reuse a local virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,peers]"
	# k-diffusion's samplers as peers (probflow.bench.kdiffusion loads only its sampling.py: its __init__ imports torchvision)
	$(PY) -m pip install -q --no-deps k-diffusion
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/probflow demo --out out/probflow-demo.png --force

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/probflow bench

lint: $(STAMP)
	$(VENV)/bin/ruff check probflow tests benchmarks notebooks

clean:
	rm -rf $(VENV)
