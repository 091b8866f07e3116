# The README's two commands: `make demo` and `make test`. Both build .venv themselves.
# torch is installed first, pinned, so pip takes the local CPU build instead of the CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# lmms-eval without its declared dependencies (torchvision/timm wheels do not import against the CPU
# torch); the few it needs on dymu's path come with the test extra (dymu[eval-cpu]).
LMMS_EVAL_VERSION ?= 0.7.3

.PHONY: demo test install clean

$(BIN)/dymu: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	@touch $@

install: $(BIN)/dymu

demo: install
	$(BIN)/dymu demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info
