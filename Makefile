# All set-up happens here: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-core
EXTRAS ?= interop-cpu,litert,onnx,flax,test

.PHONY: demo test bench bench-quick parity lint clean

# PyTorch (a benchmark peer, and an extra check of the weight converters): the
# CPU-only wheel from $(TORCH_WHEELS) when it is there (an unpinned `torch` from
# the index would be a multi-GB CUDA build); without it those cells read n/a.
TORCH_WHEELS ?= /opt/wheels
TORCH_PIN    ?= torch==2.13.0+cpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	if ls $(TORCH_WHEELS)/torch-*+cpu-*.whl >/dev/null 2>&1; then \
	  $(PY) -m pip install -q --find-links $(TORCH_WHEELS) "$(TORCH_PIN)"; \
	else \
	  echo "no CPU torch wheel in $(TORCH_WHEELS): PyTorch checks and peers will be n/a"; \
	fi
	touch $(STAMP)

# TensorFlow and NumPy only, for the test that a SavedModel runs without JAX.
.venv-tf/.installed: | $(STAMP)
	$(PY) tests/tf_only_env.py

# The `bench` extra's torchvision pins torch: without a (CPU) torch installed
# first, pip would fetch a CUDA build, so then only the plotting tools go in.
$(VENV)/.installed-bench: $(STAMP)
	if $(PY) -c "import torch" 2>/dev/null; then \
	  $(PY) -m pip install -q -e ".[$(EXTRAS),bench]"; \
	else \
	  $(PY) -m pip install -q "matplotlib>=3.7" "tqdm>=4.60"; \
	  echo "no torch: dw5d bench --models will skip every network"; \
	fi
	touch $@

demo: $(STAMP)
	$(VENV)/bin/dw5d demo

test: $(STAMP) .venv-tf/.installed
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q  # file order: tests/conftest.py

parity: $(STAMP)
	$(VENV)/bin/dw5d parity

bench: $(VENV)/.installed-bench
	$(VENV)/bin/dw5d bench

bench-quick: $(VENV)/.installed-bench
	$(VENV)/bin/dw5d bench --quick

lint: $(STAMP)
	$(PY) -m pip install -q -e ".[$(EXTRAS),lint]"
	$(VENV)/bin/ruff check dw5d_jax interop tests benchmarks

clean:
	rm -rf $(VENV) .venv-tf .venv-tf.lock build *.egg-info .pytest_cache .hypothesis
