# Two commands for a fresh clone: `make demo` and `make test`. Each sets itself up first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck pytest bench clean

setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo.sh

test: setup lint typecheck pytest

lint:
	$(BIN)/ruff check pipeline workers keyserver dashboard hlsvault tests bench

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/bench_encrypt.py
	$(BIN)/python bench/bench_package.py
	$(BIN)/python bench/bench_upload.py
	$(BIN)/python bench/bench_orchestration.py
	$(BIN)/python bench/bench_scaling.py
	$(BIN)/python bench/bench_keyserver.py
	$(BIN)/python bench/bench_ladder.py
	$(BIN)/python bench/bench_chunks.py

clean:
	rm -rf $(VENV) .cache hlsvault-data .mypy_cache .ruff_cache .pytest_cache
