# The two commands of the README. Each sets up .venv (Python 3.12, pinned packages) when it is
# missing or stale, then does its job; tools/ensure-venv.sh returns in a moment when all is current.
PYTHON_VENV := .venv/bin/python
# `make run` trains the default job into a new run directory each time (override: make run RUN_DIR=...).
RUN_DIR ?= runs/tiny-cpu-$(shell date +%Y%m%d-%H%M%S)

# `make test` runs the suite in TEST_WORKERS pytest-xdist workers, a test file per worker at a time (its
# module fixtures built once): most tests wait on process start-up, which two workers overlap.
TEST_WORKERS ?= 2

.PHONY: run test setup clean

setup:
	@bash tools/ensure-venv.sh

run: setup
	@$(PYTHON_VENV) -m mhc_megatron.train --config configs/tiny-cpu.yaml run_dir=$(RUN_DIR) save=$(RUN_DIR)/checkpoints

test: setup
	@$(PYTHON_VENV) -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf .venv build *.egg-info .pytest_cache
