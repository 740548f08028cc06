# Two commands do all the set-up on a fresh machine:
#   make train   installs into .venv and runs the short default training job
#   make test    installs into .venv and runs the default test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --constraint constraints.txt
STAMP := $(VENV)/.installed
TRAIN_ARGS ?=

.PHONY: install train test test-slow lint docs bench-quick bench-full bench-sweep bench-long clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel, so nothing else can pull a CUDA build.
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py --model vae --reg poly $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check polyreg_cnf callbacks datamodules train.py tests benchmarks

# The documentation site (mkdocs.yml) into build/site; --strict as in tests/test_docs.py.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --suite quick --jobs 2

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --suite full --jobs 2

bench-sweep: $(STAMP)
	$(PY) -m benchmarks.run --suite sweep --jobs 2

# One invocation per workload, each within 150 minutes on 2 cores (measured: the table 57,
# 8gaussians 36; the checkerboard's runs take 18-24 minutes each, about 100 for its 9); the
# same command resumes an interrupted one. The last line summarises every finished run of the
# suite into benchmarks/results/long.md.
bench-long: $(STAMP)
	for w in mixture16 8gaussians checkerboard; do \
		$(PY) -m benchmarks.run --suite long --workloads $$w --jobs 2 || exit 1; done
	$(PY) -m benchmarks.run --suite long --cached-only
