# The two commands of the README. Both create .venv on a fresh machine and install everything into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo_out
# pytest workers: the suite is mostly XLA compiles and torch references, which parallelise over processes.
# `--dist loadgroup` (tests/conftest.py) keeps the tests that need up to ~12 GB (large VOLO variants, the 8-device
# training step) on one worker, one after another, so two of them never meet in the 24 GB of the development/CI
# machine; the other workers take every other test, slow ones included.
WORKERS ?= 2
# glibc's huge-page malloc for XLA:CPU's per-step temp buffers (see volo_jax.xla.reexec_with_hugepage_malloc), set
# for every command here so that the CLIs need not re-execute themselves; glibc < 2.35 and other libcs ignore it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

## make demo: the main job end to end on built-in data. Writes scikit-learn's handwritten digits (real 8x8 scans) as
## an ImageNet-layout folder, trains volo_d1_224 at 32 px on it (configs/volo_d1_digits.py, augmentations on) with
## the data-parallel trainer over 2 simulated devices, reloads the saved checkpoint with eval.py for the held-out
## accuracy, then, for each of the four seed models, randomizes timm's weights, converts them with the CLI and prints
## the parity report against timm.
SEED_MODELS ?= volo_d1_224 poolformer_m36 ese_vovnet19b_dw convit_base
DEMO_EPOCHS ?= 10
demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PY) -m volo_jax.tools.digits $(DEMO)/digits
	XLA_FLAGS=--xla_force_host_platform_device_count=2 $(PY) train.py $(DEMO)/digits \
		--config configs/volo_d1_digits.py --epochs $(DEMO_EPOCHS) --output $(DEMO)/run
	XLA_FLAGS=--xla_force_host_platform_device_count=2 $(PY) eval.py $(DEMO)/digits --model volo_d1_224 \
		--img-size 32 -b 64 --checkpoint $(DEMO)/run/checkpoints --results-file $(DEMO)/run/eval.json --results-format json
	@set -e; for m in $(SEED_MODELS); do \
		echo "=== $$m: randomize -> .safetensors -> python -m converters -> parity vs timm"; \
		$(PY) -m converters.parity --model $$m --save-random $(DEMO)/$$m.safetensors --no-compare; \
		$(PY) -m converters $(DEMO)/$$m.safetensors --model $$m --output $(DEMO)/$${m}_flax; \
		$(PY) -m converters.parity --model $$m --checkpoint $(DEMO)/$$m.safetensors --flax-params $(DEMO)/$${m}_flax; \
	done

## make test: the whole suite, slow cases included (they are marked, never dropped).
test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --dist loadgroup --durations=25 tests

lint: $(STAMP)
	$(PY) -m ruff check volo_jax converters tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks --readme README.md

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
