# The two commands of the README. Both create .venv on a fresh machine and install everything into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo_out
# pytest workers for the fast part: mostly XLA compiles and torch references, which parallelise over processes.
# The slow part (large variants: timm + our model + converted copies, up to ~12 GB per process) runs in one
# process afterwards, so two of them never meet in the 24 GB of the development/CI machine.
WORKERS ?= 2

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

## make demo: randomize every tensor of timm's volo_d1_224, save it as .safetensors (no hub is reachable here),
## convert it to Flax params with the CLI, then load those params into our JAX model, the .safetensors into timm,
## and print the parity report (logits, pre-logits, stages, every block).
demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PY) -m converters.parity --model volo_d1_224 --save-random $(DEMO)/volo_d1_224_random.safetensors --no-compare
	$(PY) -m converters $(DEMO)/volo_d1_224_random.safetensors --model volo_d1_224 --output $(DEMO)/volo_d1_224_flax
	$(PY) -m converters.parity --model volo_d1_224 --checkpoint $(DEMO)/volo_d1_224_random.safetensors \
		--flax-params $(DEMO)/volo_d1_224_flax

## make test: the whole suite, slow cases included (they are marked, never dropped).
test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) -m "not slow" --durations=10 tests
	$(PY) -m pytest -p no:xdist -m slow --durations=15 tests

lint: $(STAMP)
	$(PY) -m ruff check volo_jax converters tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
