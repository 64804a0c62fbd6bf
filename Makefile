# The two commands a newcomer types are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export KERAS_BACKEND := tensorflow
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: help demo test lint format bench clean test-official

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)  ## Set up, then train a ReLU model and its SAT twin on built-in data (no download).
	$(PY) tools/demo.py

$(VENV)/.bench-installed: $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench-installed  ## Set up with ART/CleverHans, run all benchmarks (~14 min on 2 cores), rewrite benchmarks/README.md, keep the output in benchmarks/raw/.
	mkdir -p benchmarks/raw
	bash -o pipefail -c '$(PY) benchmarks/run_all.py --from-make 2>&1 | tee benchmarks/raw/make_bench.log'

# The official SAT ResNet code under TF 2.21 (tf.compat.v1 + tf-keras + Tensorpack), never in `make test`.
OFFICIAL_VENV := .venv-official
SAT_OFFICIAL_DIR ?= ../SmoothAdversarialTraining
IMAGENETTE_VAL ?= /tmp/imagenette-224/val

$(OFFICIAL_VENV)/.installed:
	test -x $(OFFICIAL_VENV)/bin/python || $(PYTHON) -m venv $(OFFICIAL_VENV)
	$(OFFICIAL_VENV)/bin/python -m pip install -q tensorflow-cpu==2.21.0 tf-keras==2.21.0 \
		tensorpack==0.11 opencv-python-headless
	touch $@

test-official: $(OFFICIAL_VENV)/.installed  ## Rewrite tests/official/ from the official code (SAT_OFFICIAL_DIR, IMAGENETTE_VAL).
	$(OFFICIAL_VENV)/bin/python tests/official/make_reference.py \
		--official_dir=$(SAT_OFFICIAL_DIR) --images=$(IMAGENETTE_VAL)
	git diff --stat -- tests/official

test: $(STAMP)  ## Set up, then run the linter and the test suite.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## Lint only.
	$(VENV)/bin/ruff check .

format: $(STAMP)  ## Reformat the code in place.
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:  ## Remove the virtual environment and caches.
	rm -rf $(VENV) .pytest_cache .ruff_cache
