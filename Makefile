# Two commands on a fresh machine:  make demo   (set up + demo training)   make test   (set up + tests)
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
EXTRA  := $(VENV)/.extra-$(shell cksum requirements-extra.txt | cut -d' ' -f1)
# one torch thread unless told otherwise: on 2 shared cores, 2 threads were measured up to 8x slower
THREADS := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

.PHONY: setup demo test test-fast gui bench clean-demo

$(STAMP): requirements.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

setup: $(STAMP)

# optional optimizers, so their tests run (no-deps: they need nothing beyond torch)
$(EXTRA): requirements-extra.txt $(STAMP)
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-extra.txt
	@rm -f $(VENV)/.extra-*; touch $(EXTRA)

demo: setup
	$(THREADS) $(VPY) tools/demo.py

# Test files are spread over TEST_WORKERS processes (pytest-xdist), one torch thread each; a file's
# tests stay in one process so its module fixtures (trained models) are built once.
TEST_WORKERS ?= 2
PYTEST := $(THREADS) $(VPY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test: setup $(EXTRA)
	$(PYTEST) tests

test-fast: setup $(EXTRA)
	$(PYTEST) -m "not slow" tests

gui: setup
	$(VPY) -m gui

bench: setup
	$(THREADS) $(VPY) bench/run_all.py

clean-demo:
	rm -rf demo
