# The README's two commands: `make demo` and `make test` (and `make docs`, the site in docs/). Both build .venv themselves, from the
# committed lock (requirements/lock.txt: exact versions of everything installed), so a clone next
# month installs what CI tested. Versions: README "Versions"; `make lock` refreshes the locks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
OLDEST_LOCK := requirements/lock-oldest.txt
# The extras the test environments install: test (pytest and the extras it uses) and docs (mkdocs, for
# `make docs`; one environment resolved from one lock, so the docs build, the docs' code blocks run by the
# tests and the CLI reference generated from the parsers all see the same versions; CI builds the site in
# the newest and the oldest environment). lmms-eval goes in without its declared dependencies:
# those pull torchvision/timm, whose wheels do not import against the CPU torch; what its evaluator
# needs on dymu's path comes with the eval-cpu extra. Keep LMMS_EVAL the range of pyproject's eval extra.
EXTRAS := test,docs
comma := ,
LMMS_EVAL := lmms-eval>=0.7.3,<0.8
# The tests that touch transformers internals (patched layers, VLM wirings, generate, lmms-eval):
# what `make test-oldest` runs again on the oldest supported versions.
INTERNALS_TESTS := tests/towers tests/decoders tests/families tests/integrations tests/test_env.py

.PHONY: demo test install clean lock test-latest test-oldest docs docs-oldest wheel-check

# $(1): venv folder, $(2): pip constraint arguments (empty: the newest versions the ranges allow).
# torch goes first, pinned by the range, so pip takes the local CPU build instead of the CUDA wheels.
define make_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q $(2) "torch>=2.13,<2.14"
	$(1)/bin/pip install -q $(2) -e ".[$(EXTRAS)]"
	$(1)/bin/pip install -q $(2) --no-deps "$(LMMS_EVAL)"
endef

$(BIN)/dymu: pyproject.toml $(LOCK)
	$(call make_venv,$(VENV),-c $(LOCK))
	@touch $@

install: $(BIN)/dymu

demo: install
	$(BIN)/dymu demo

test: install
	$(BIN)/python -m pytest

# The documentation site (mkdocs.yml, docs/): warnings are errors. docs/cli.md is generated from the parsers
# (`python docs/gen_cli.py` rewrites it): a stale one fails here first.
docs: install
	$(BIN)/python docs/gen_cli.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-oldest: .venv-oldest/bin/dymu
	.venv-oldest/bin/python docs/gen_cli.py --check
	NO_MKDOCS_2_WARNING=1 .venv-oldest/bin/mkdocs build --strict --site-dir .site-oldest

# The oldest supported versions (every lower bound in pyproject.toml), on the tests that touch
# transformers internals.
.venv-oldest/bin/dymu: pyproject.toml $(OLDEST_LOCK)
	$(call make_venv,.venv-oldest,-c $(OLDEST_LOCK))
	@touch $@

test-oldest: .venv-oldest/bin/dymu
	.venv-oldest/bin/python -m pytest $(INTERNALS_TESTS)

# The newest versions the declared ranges allow, ignoring the lock: catches the next release early.
test-latest:
	$(call make_venv,.venv-latest,)
	.venv-latest/bin/python -m pytest

# Refresh both locks: resolve the newest versions inside the ranges, and every lower bound, and
# write what got installed. Run `make test` and `make test-oldest` on the result before committing.
lock:
	$(call make_venv,.venv-lock,)
	.venv-lock/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//' > $(LOCK)
	$(PYTHON) requirements/lower_bounds.py pyproject.toml $(subst $(comma), ,$(EXTRAS)) viz eval eval-cpu video > .lower-bounds.txt
	$(call make_venv,.venv-lock,-c .lower-bounds.txt)
	.venv-lock/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//' > $(OLDEST_LOCK)
	rm -rf .venv-lock .lower-bounds.txt

# What a user of the package index will get: `python -m build` makes the wheel and sdist, the wheel goes
# into a fresh venv (torch first, then the wheel's own dependencies, from the lock), and `dymu demo` runs
# from it in an empty folder (the bundled images and the entry point come from the wheel, not the clone).
BUILD := build==1.6.1
wheel-check:
	rm -rf dist .venv-build .venv-wheel
	$(PYTHON) -m venv .venv-build
	.venv-build/bin/pip install -q "$(BUILD)"
	.venv-build/bin/python -m build -q --outdir dist .
	$(PYTHON) -m venv .venv-wheel
	.venv-wheel/bin/pip install -q --upgrade pip
	.venv-wheel/bin/pip install -q -c $(LOCK) "torch>=2.13,<2.14"
	.venv-wheel/bin/pip install -q -c $(LOCK) dist/*.whl
	cd "$$(mktemp -d)" && $(CURDIR)/.venv-wheel/bin/dymu demo --max-new-tokens 2 && $(CURDIR)/.venv-wheel/bin/dymu --version
	rm -rf .venv-build .venv-wheel

clean:
	rm -rf $(VENV) .venv-oldest .venv-latest .venv-lock .venv-build .venv-wheel build dist src/*.egg-info site .site-oldest
