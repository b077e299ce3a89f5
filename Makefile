# The two commands of the README. Each sets up .venv (Python 3.12, pinned packages) when it is
# missing or stale, then does its job; tools/ensure-venv.sh returns in a moment when all is current.
PYTHON_VENV := .venv/bin/python

.PHONY: run test setup clean

setup:
	@bash tools/ensure-venv.sh

run: setup
	@$(PYTHON_VENV) -m mhc_megatron.demo

test: setup
	@$(PYTHON_VENV) -m pytest

clean:
	rm -rf .venv build *.egg-info .pytest_cache
