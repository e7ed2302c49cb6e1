# Two commands on a fresh machine (Linux, Python >= 3.10):
#   make demo    set up .venv on first use, then run the tutorial walk-through
#   make test    the same set-up, then the test suite (PYTEST_ARGS="tests/test_layer.py -x" passes arguments)
# The set-up: a virtual environment .venv in this directory; torch $(TORCH_VERSION), a CUDA build where
# nvidia-smi lists a GPU, the CPU build elsewhere; then this package, editable, with its test extras.
# A later run reuses .venv: it is set up again only when pyproject.toml or setup.py is newer than
# its stamp (`make clean` removes .venv).

PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/python -m pip
TORCH_VERSION := 2.13.0
# The CPU-only build of torch (about 200 MB; PyPI's Linux wheel brings about 3 GB of CUDA libraries).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.fused_lora-installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(VENV)/bin/python -m fused_lora demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
		|| { echo "fused_lora needs Python >= 3.10: run make PYTHON=/path/to/python3.X"; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then \
		echo "GPU found: installing torch $(TORCH_VERSION), CUDA build"; \
		$(PIP) install --quiet torch==$(TORCH_VERSION); \
	else \
		echo "no GPU (no nvidia-smi, or it lists none): installing torch $(TORCH_VERSION), CPU build"; \
		$(PIP) install --quiet --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null \
			|| $(PIP) install --quiet --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	fi
	@# torch's own dependencies come with the package's, from the usual index.
	$(PIP) install --quiet -e ".[test]"
	@$(VENV)/bin/python -c 'import torch, fused_lora; print(f"torch {torch.__version__} (CUDA: {torch.cuda.is_available()}), fused_lora {fused_lora.__version__} in $(VENV)")'
	@touch $@

clean:
	rm -rf $(VENV)
