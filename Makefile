# make tutorial : set up .venv and run every notebook headless in the toy world (no progress bars in the saved outputs)
# make lab      : set up .venv and open JupyterLab on the notebooks
# make test     : set up .venv and run the tests (notebooks stripped, helpers, site, notebooks)
# make site     : set up .venv and render the executed chapters (saved outputs, never run) as HTML in build/site
# make check-stripped : fail if a notebook carries volatile metadata (`make strip` fixes it)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# `make site`: Sphinx with myst-nb, configured in docs/conf.py; tests/test_site.py runs the same arguments.
SITE ?= build/site
SITE_ARGS := -b html -W --keep-going -E -c docs .

.PHONY: install lab tutorial test test-fast test-slow toy-world toy-world-gpu evaluate-world strip check-stripped site clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[lab,docs]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

lab: install
	$(BIN)/jupyter lab notebooks/

tutorial: install
	@for nb in notebooks/[0-9]*.ipynb; do \
		echo "== $$nb"; \
		TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 "$$nb" || exit 1; \
	done
	$(BIN)/nbstripout --keep-output --keep-count --extra-keys 'metadata.language_info' notebooks/*.ipynb notebooks/solutions/*.ipynb
	@echo "All chapters ran; outputs are in notebooks/."

# Two pytest workers of one thread each (pytest-xdist): both cores busy, never oversubscribed; a notebook's cells stay
# together on one worker, in order (--dist loadfile).
TEST_WORKERS ?= 2
test: install check-stripped
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --nbval-lax --nbval-current-env notebooks/

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q tests -m slow

# The committed world's four CPU runs (about 100 + 90 + 85 + 10 minutes on 2 cores), written to runs/ beside the
# committed world: the VAE (its UNet is replaced), then the UNet alone on that VAE, then that UNet continued, then
# the detector on scenes that include the held-out pairs; the CLIP is data/toy's.
toy-world: install
	$(BIN)/python -m compinv_utils.worldbuilding.train --out runs/world3 --profile cpu-full --stages vae,unet --from data/toy --workers 2 --cache-dir runs/cache
	$(BIN)/python -m compinv_utils.worldbuilding.train --out runs/world4 --profile cpu-full --stages unet --from runs/world3 --unet-steps 9000 --workers 2 --cache-dir runs/cache
	$(BIN)/python -m compinv_utils.worldbuilding.train --out runs/world5 --profile cpu-full --stages unet --from runs/world4 --init-unet runs/world4/pipeline/unet --unet-steps 8000 --workers 2 --cache-dir runs/cache
	$(BIN)/python -m compinv_utils.worldbuilding.train --out runs/world5 --profile cpu-full --stages detector --det-steps 2500 --det-batch 128 --workers 2 --cache-dir runs/cache
	@echo "The rebuilt world is in runs/world5: COMPINV_TOY_DIR=runs/world5 make evaluate-world measures it."

# The UNet on one lent GPU in one call of under 10 minutes (run on an H200: data/toy/logs/gpu_unet_runs.json):
# 100,000 scenes rendered on the machine's CPU cores (75 s on 16), then the UNet alone in batches of 1,024 for
# GPU_UNET_MINUTES, the VAE, CLIP and detector taken from data/toy. GPU_PYTHON must have a CUDA build of torch and
# the packages of pyproject.toml (the CPU-only .venv would not do); GPU_UNET_WIDTHS=128,128 widens the UNet. A CLIP
# that must tell pattern words apart, then the UNet on its text tower: GPU_STAGES=clip,unet GPU_UNET_MINUTES=4.5
# GPU_ARGS="--init-clip data/toy/clip --clip-full-captions --clip-pattern-negatives --clip-lr 1e-4 --clip-steps 1500";
# or the UNet on a world whose CLIP was tuned before: GPU_FROM=<that world>. A caption policy goes in GPU_ARGS and
# GPU_DATA_ARGS both (e.g. --caption-policy 0.5,1.0,0.5,0.5), so that the UNet finds the data set rendered for it.
GPU_PYTHON ?= python3
GPU_DEVICE ?= cuda
GPU_PROFILE ?= gpu-short
GPU_UNET_MINUTES ?= 5.5
GPU_UNET_WIDTHS ?= 64,128
GPU_STAGES ?= unet
GPU_ARGS ?=
GPU_DATA_ARGS ?=
GPU_FROM ?= data/toy
GPU_OUT ?= runs/world-gpu
toy-world-gpu:
	$(GPU_PYTHON) -m compinv_utils.worldbuilding.train --profile $(GPU_PROFILE) --data-only --cache-dir runs/cache $(GPU_DATA_ARGS)
	$(GPU_PYTHON) -m compinv_utils.worldbuilding.train --out $(GPU_OUT) --profile $(GPU_PROFILE) --device $(GPU_DEVICE) --stages $(GPU_STAGES) --from $(GPU_FROM) --unet-minutes $(GPU_UNET_MINUTES) --unet-widths $(GPU_UNET_WIDTHS) --cache-dir runs/cache $(GPU_ARGS)
	@echo "The rebuilt world is in $(GPU_OUT): COMPINV_TOY_DIR=$(GPU_OUT) make evaluate-world measures it."

evaluate-world: install
	$(BIN)/python -m compinv_utils.worldbuilding.quality --out $${COMPINV_TOY_DIR:-data/toy}/quality.json

strip:
	$(BIN)/nbstripout --keep-output --keep-count --extra-keys 'metadata.language_info' notebooks/*.ipynb notebooks/solutions/*.ipynb

check-stripped: install
	@$(BIN)/nbstripout --verify --keep-output --keep-count --extra-keys 'metadata.language_info' notebooks/*.ipynb notebooks/solutions/*.ipynb \
		|| { echo "Notebooks above carry volatile metadata: run 'make strip' and commit them."; exit 1; }

site: install
	$(BIN)/python -m sphinx $(SITE_ARGS) $(SITE)
	@echo "Open $(SITE)/index.html"

clean:
	rm -rf $(VENV) .pytest_cache
