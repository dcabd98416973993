# Two commands on a fresh machine:  `make demo` (explain SmolLM2 on a prompt)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onnx-lrp-installed

.PHONY: venv venvs demo test bench clean-cache

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# export venvs of other frameworks (TensorFlow, JAX: requirements-tf.txt / requirements-jax.txt), built once and
# cached in ~/.cache/onnx-lrp/venvs (tests/frameworks/venvs.py; ~1 min each)
venvs: venv
	$(PY) tests/frameworks/venvs.py tf jax

demo: venv
	$(VENV)/bin/onnx-lrp demo

test: venv
	-$(PY) tests/frameworks/venvs.py tf jax  # one that cannot be built fails its own tests, with pip's message
	$(PY) -m pytest -q -p no:cacheprovider

clean-cache:
	rm -rf $(HOME)/.cache/onnx-lrp
