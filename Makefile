# The two commands a newcomer types are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The JAX backend suite runs in a venv without TensorFlow: proof that the core needs none.
JAX_VENV := .venv-jax
JAX_PY := $(JAX_VENV)/bin/python
JAX_STAMP := $(JAX_VENV)/.installed
# The PyTorch backend suite, and the reference AutoAttack on the same model, in a third venv
# without TensorFlow (torch's CPU build).
TORCH_VENV := .venv-torch
TORCH_PY := $(TORCH_VENV)/bin/python
TORCH_STAMP := $(TORCH_VENV)/.installed
# torch's CPU build: from a local wheel or PyPI mirror if one has it, else from PyTorch's index.
TORCH_PIN := $(shell grep -m1 '^torch==' requirements-torch.txt)
TORCH_INDEX := https://download.pytorch.org/whl/cpu
# $(call install_torch,PYTHON): PyTorch's index is asked only when no local wheel or mirror has it.
install_torch = $(1) -m pip install -q $(TORCH_PIN) 2>/dev/null \
	|| $(1) -m pip install -q $(TORCH_PIN) --extra-index-url $(TORCH_INDEX)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# The Keras backend of `make demo` (and bench): `make demo BACKEND=jax` or `KERAS_BACKEND=jax make
# demo`; TensorFlow by default. `make test` runs both backends whatever this says.
BACKEND ?= $(or $(KERAS_BACKEND),tensorflow)
export KERAS_BACKEND := $(BACKEND)
# --dist worksteal: an idle worker takes queued tests from the other, so the run does not end
# on one worker finishing a long file alone.
PYTEST_ARGS ?= -n 2 --dist worksteal --durations=15 -m "not heavy"
# Under JAX: the modules whose code paths are JAX's own (compiled attacks against TensorFlow's
# verdicts on real images, padding to batch buckets, custom_vjp, the stateless train step,
# DataParallel, resume, saving). The attack variants' own modules run under TensorFlow and
# PyTorch; under JAX each test compiles for seconds, past `make test`'s 10 minutes.
NOT_UNDER_JAX := attacks autoattack evaluation fab convert logits robustbench
JAX_PYTEST_ARGS ?= -n 2 --dist worksteal --durations=10 \
	$(foreach m,$(NOT_UNDER_JAX),--ignore=tests/test_$(m).py)
TORCH_PYTEST_ARGS ?= -n 2 --dist worksteal --durations=10

.PHONY: help demo test test-jax test-torch lint format bench clean test-official

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Each backend trains its own runs (the demo reuses finished runs of its folder).
DEMO_RUNS := runs/demo$(if $(filter-out tensorflow,$(BACKEND)),-$(BACKEND))

# `make demo BACKEND=torch` adds torch's CPU build to .venv (tools/ read tf.data, so TensorFlow stays).
$(VENV)/.torch-installed: $(STAMP) requirements-torch.txt
	$(call install_torch,$(PY))
	touch $@

demo: $(STAMP) $(if $(filter torch,$(BACKEND)),$(VENV)/.torch-installed)  ## Set up, then train a ReLU model and its SAT twin on built-in data (no download); BACKEND=jax or torch for those.
	$(PY) tools/demo.py --runs_dir=$(DEMO_RUNS)

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

$(JAX_STAMP): requirements-jax.txt pyproject.toml
	test -x $(JAX_PY) || $(PYTHON) -m venv $(JAX_VENV)
	$(JAX_PY) -m pip install -q --upgrade pip
	$(JAX_PY) -m pip install -q -r requirements-jax.txt
	$(JAX_PY) -m pip install -q --no-deps -e .
	touch $(JAX_STAMP)

$(TORCH_STAMP): requirements-torch.txt pyproject.toml
	test -x $(TORCH_PY) || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_PY) -m pip install -q --upgrade pip
	$(call install_torch,$(TORCH_PY))
	$(TORCH_PY) -m pip install -q -r requirements-torch.txt
	$(TORCH_PY) -m pip install -q --no-deps -e .
	touch $(TORCH_STAMP)

# The three virtual environments are built side by side (pip mostly waits on disk and network).
# The suites run one after the other: side by side (make -j2) they took longer, 12 min 38 s.
test:  ## Set up, then run the linter, the suite under TensorFlow, the backend suites under JAX and PyTorch.
	$(MAKE) -j3 --no-print-directory $(STAMP) $(JAX_STAMP) $(TORCH_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	KERAS_BACKEND=tensorflow $(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-jax
	$(MAKE) --no-print-directory test-torch

# pytest's exit status 5 (no test collected) fails this step like any other failure.
test-jax: $(JAX_STAMP)  ## The tests marked `backends`, under JAX, without TensorFlow (.venv-jax).
	KERAS_BACKEND=jax $(JAX_PY) -m pytest -m backends $(JAX_PYTEST_ARGS)

# The reference AutoAttack's agreement with ours on one model runs here, on every CI run.
test-torch: $(TORCH_STAMP)  ## The tests marked `backends`, under PyTorch, without TensorFlow (.venv-torch).
	KERAS_BACKEND=torch $(TORCH_PY) -m pytest -m backends $(TORCH_PYTEST_ARGS)

lint: $(STAMP)  ## Lint only.
	$(VENV)/bin/ruff check .

format: $(STAMP)  ## Reformat the code in place.
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:  ## Remove the virtual environment and caches.
	rm -rf $(VENV) $(JAX_VENV) $(TORCH_VENV) .pytest_cache .ruff_cache
