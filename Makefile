# Two commands for a fresh clone: `make demo` and `make test`. Each sets itself up first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup setup-demo demo test lint typecheck pytest pytest-fast bench clean

# Everything: the dev tools, redis-server, chromium, npm and hls.js the test suite needs.
setup:
	@scripts/setup.sh test

# Only what the demo needs: ffmpeg and hlsvault in .venv.
setup-demo:
	@scripts/setup.sh demo

demo: setup-demo
	@scripts/demo.sh

test: setup lint typecheck pytest

lint:
	$(BIN)/ruff check pipeline workers keyserver dashboard hlsvault tests bench
	$(BIN)/cfn-lint deploy/aws/hlsvault.yaml

typecheck:
	$(BIN)/mypy

# One test process per core; a file's tests stay on one process (they share its fixtures).
pytest:
	$(BIN)/pytest -q -n auto --dist loadfile

# The unit and in-process tests only, in about 40 s: no end-to-end packaging of longer clips.
pytest-fast:
	$(BIN)/pytest -q -m "not slow" -n auto --dist loadfile

bench: setup
	$(BIN)/python bench/bench_encrypt.py
	$(BIN)/python bench/bench_package.py
	$(BIN)/python bench/bench_upload.py
	$(BIN)/python bench/bench_orchestration.py
	$(BIN)/python bench/bench_scaling.py
	$(BIN)/python bench/bench_keyserver.py
	$(BIN)/python bench/bench_ratelimit.py
	$(BIN)/python bench/bench_ladder.py
	$(BIN)/python bench/bench_chunks.py

clean:
	rm -rf $(VENV) .cache hlsvault-data .mypy_cache .ruff_cache .pytest_cache
