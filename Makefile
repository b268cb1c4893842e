# make demo: set up .venv from nothing, then run the main job on the bundled sample data.
# make test: set up .venv from nothing, then lint, type-check, check the import contracts and
# function sizes, build the documentation site strictly, and run the test suite.
PYTHON ?= python3
# Where pip finds torch. Empty: pip's own index (a CPU build where it serves one). On a machine
# whose index serves a CUDA build of several GB: make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup demo test lint docs unit clean

setup: $(STAMP)

# torch first, pinned, so the CPU build on this machine is used and nothing upgrades it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[flower,dev,bench,dp]"
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py

lint: setup
	$(BIN)/ruff check multimodal_fl tests benchmarks scripts
	$(BIN)/mypy multimodal_fl
	$(BIN)/lint-imports
	$(BIN)/python scripts/function_sizes.py --max 100 multimodal_fl

# The docs as a site (mkdocs.yml): a broken link or anchor, or a page missing from the nav,
# fails the build. tests/test_docs.py checks the blocks inside the pages.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

# The suite on the machine's cores (pytest-xdist, at most 4 workers), then the Flower tests on
# their own: they start SuperLinks, SuperNodes and ClientApp processes and wait on them, so
# they run alone, as a user's deployment would. `python -m pytest -q` still runs everything
# in one process.
unit: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 -m "not flower"
	$(BIN)/python -m pytest -q -m flower

test: lint docs unit

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache
