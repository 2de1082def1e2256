# Every target sets up .venv itself; a fresh machine needs only python3, pip and gcc.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is a CPU build on this project's machines; other versions download GBs.
TORCH  ?= torch==2.13.0
BASE   := $(VENV)/.installed-base
FULL   := $(VENV)/.installed-full
DEMO_CONFIG ?= configs/shakespeare-char-cpu.toml

.PHONY: setup lint test test-slow demo finetune-demo bench docs clean

# The package and its runtime dependencies: enough for `make demo`.
$(BASE): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

# Plus the extras the tests compare against: transformers/tokenizers/peft/trl/gguf (hf), jax/optax,
# the server and its clients (serve), mkdocs (docs: the site is built in a test), pytest, jupytext.
$(FULL): $(BASE)
	$(PY) -m pip install --quiet -e ".[dev,hf,jax,serve,docs]"
	touch $@

setup: $(FULL)

# Style first (ruff: line length 110, pycodestyle, pyflakes, import order), then the tests.
lint: $(FULL)
	$(PY) -m ruff check src tests benchmarks docs

test: lint
	$(PY) -m pytest -q

# The slow tests also run GGUF files through llama.cpp (llama-cpp-python builds it once, ~3.5 min).
test-slow: $(FULL)
	$(PY) -m pip install --quiet -e ".[llama]"
	$(PY) -m pytest -q -m slow

# Fetch the built-in Shakespeare corpus, train a character-level model on the CPU, sample from it.
demo: $(BASE)
	$(PY) -m minillm.cli prepare --source shakespeare --tokenizer char --out data/shakespeare-char
	$(PY) -m minillm.cli train --config $(DEMO_CONFIG)
	$(PY) -m minillm.cli sample --run runs/shakespeare-char-cpu --prompt "ROMEO:" --max-new-tokens 500 --sliding-window --seed 1

# Pretrain a BPE base (reused when present), fine-tune it with LoRA on the built-in task set, print
# exact-match accuracy before (3-shot) and after, and one chat exchange on a held-out question.
FT_BASE ?= runs/shakespeare-bpe-base
finetune-demo: $(BASE)
	$(PY) -m minillm.cli prepare --source shakespeare --tokenizer bpe --vocab-size 1024 --out data/shakespeare-bpe
	test -f $(FT_BASE)/model.safetensors || $(PY) -m minillm.cli train --config configs/shakespeare-bpe-base.toml
	$(PY) -m minillm.cli eval --run $(FT_BASE) --tasks builtin:shakespeare-tasks --few-shot 3
	rm -rf runs/tasks-lora
	$(PY) -m minillm.cli finetune --run $(FT_BASE) --data builtin:shakespeare-tasks --method lora --out runs/tasks-lora
	$(PY) -m minillm.cli eval --run runs/tasks-lora --tasks builtin:shakespeare-tasks
	printf 'Last word: So oft as that shall be,\n/exit\n' | $(PY) -m minillm.cli chat --run runs/tasks-lora --temperature 0

# The docs site (mkdocs.yml): every figure drawn by the current code into docs/images/figures/ (the
# first run trains a small model, ~2 min; later runs reuse runs/figures/), then the pages built in
# strict mode into site/: a missing figure, a broken link or a code link that does not import fails.
docs: $(FULL)
	$(PY) -m minillm.viz.figures
	$(PY) -m mkdocs build --strict

bench: $(FULL)
	@echo "benchmarks: see BENCHMARKS.md for each script's command"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
