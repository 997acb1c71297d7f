# All set-up happens here: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-core
EXTRAS ?= interop-cpu,flax,test

.PHONY: demo test bench bench-quick parity lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

# TensorFlow and NumPy only, for the test that a SavedModel runs without JAX.
.venv-tf/.installed: | $(STAMP)
	$(PY) tests/tf_only_env.py

$(VENV)/.installed-bench: $(STAMP)
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/dw5d demo

test: $(STAMP) .venv-tf/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q

parity: $(STAMP)
	$(VENV)/bin/dw5d parity

bench: $(VENV)/.installed-bench
	$(VENV)/bin/dw5d bench

bench-quick: $(VENV)/.installed-bench
	$(VENV)/bin/dw5d bench --quick

clean:
	rm -rf $(VENV) .venv-tf .venv-tf.lock build *.egg-info .pytest_cache .hypothesis
