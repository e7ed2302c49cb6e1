# Two commands on a fresh machine (Linux, Python >= 3.10):
#   make demo    set up .venv on first use, then run the tutorial walk-through
#   make test    the same set-up plus the test extras, then the test suite (PYTEST_ARGS="tests/modules/test_layer.py -x"
#                passes arguments)
# The set-up: a virtual environment .venv in this directory; torch $(TORCH_VERSION), a CUDA build where
# nvidia-smi lists a GPU, the CPU build elsewhere; then this package, editable, with nothing more (what the
# demo needs); `make test` adds the test extras (peft, transformers, trl, bitsandbytes, torchao, pytest, ...).
# A later run reuses .venv: it is set up again only when pyproject.toml or setup.py is newer than its
# stamp, or when PYTHON is given and is not the interpreter .venv was made with (then .venv is rebuilt,
# and make says so). `make clean` removes .venv.

PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/python -m pip
TORCH_VERSION := 2.13.0
# The CPU-only build of torch (about 200 MB; PyPI's Linux wheel brings about 3 GB of CUDA libraries).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.fused_lora-installed
TEST_STAMP := $(VENV)/.fused_lora-test-installed

# A PYTHON given on the command line (or in the environment) that is not the interpreter an existing
# .venv was made with: .venv is rebuilt with it (a venv cannot change its interpreter). Compared by real
# path; a PYTHON that cannot be run differs from everything, and the set-up then says it was not found.
REBUILD :=
ifneq ($(filter command line environment environment override,$(origin PYTHON)),)
ifneq ($(wildcard $(VENV)/bin/python),)
PYTHON_REAL := $(shell $(PYTHON) -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null)
VENV_REAL := $(shell $(VENV)/bin/python -c 'import os, sys; print(os.path.realpath(sys._base_executable))' 2>/dev/null)
ifneq ($(PYTHON_REAL),$(VENV_REAL))
REBUILD := 1
endif
endif
endif

.PHONY: demo test setup setup-test clean FORCE

demo: $(STAMP)
	$(VENV)/bin/python -m fused_lora demo

test: $(TEST_STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

setup-test: $(TEST_STAMP)

$(STAMP): pyproject.toml setup.py $(if $(REBUILD),FORCE)
	@command -v $(PYTHON) >/dev/null 2>&1 \
		|| { echo "PYTHON=$(PYTHON): not found: run make PYTHON=/path/to/python3.X"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
		|| { echo "fused_lora needs Python >= 3.10; PYTHON=$(PYTHON) is Python $$($(PYTHON) -c 'import platform; \
			print(platform.python_version())' 2>/dev/null || echo '(unknown version)'): run make PYTHON=/path/to/python3.X"; \
			exit 1; }
ifneq ($(REBUILD),)
	@echo "$(VENV) was made by $(or $(VENV_REAL),an interpreter that no longer runs); PYTHON=$(PYTHON) is $(PYTHON_REAL): rebuilding $(VENV)"
	rm -rf $(VENV)
endif
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then \
		echo "GPU found: installing torch $(TORCH_VERSION), CUDA build"; \
		$(PIP) install --quiet torch==$(TORCH_VERSION); \
	else \
		echo "no GPU (no nvidia-smi, or it lists none): installing torch $(TORCH_VERSION), CPU build"; \
		$(PIP) install --quiet --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null \
			|| $(PIP) install --quiet --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	fi
	@# torch's own dependencies come with the package's, from the usual index. No extra: what the demo needs.
	$(PIP) install --quiet -e .
	@$(VENV)/bin/python -c 'import torch, fused_lora; print(f"torch {torch.__version__} (CUDA: {torch.cuda.is_available()}), fused_lora {fused_lora.__version__} in $(VENV)")'
	@touch $@

# The test extras, on top of the demo's set-up (pyproject.toml's [test]).
$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[test]"
	@touch $@

clean:
	rm -rf $(VENV)
