# make tutorial : set up .venv and run every notebook headless in the toy world (no progress bars in the saved outputs)
# make lab      : set up .venv and open JupyterLab on the notebooks
# make test     : set up .venv and run the tests (helpers and notebooks)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lab tutorial test test-fast test-slow toy-world evaluate-world strip clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[lab]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

lab: install
	$(BIN)/jupyter lab notebooks/

tutorial: install
	@for nb in notebooks/[0-9]*.ipynb; do \
		echo "== $$nb"; \
		TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 "$$nb" || exit 1; \
	done
	$(BIN)/nbstripout --keep-output --keep-count --extra-keys 'metadata.language_info' notebooks/*.ipynb
	@echo "All chapters ran; outputs are in notebooks/."

test: install
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env notebooks/

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q tests -m slow

toy-world: install
	$(BIN)/python -m compinv_utils.toy.train --out data/toy

evaluate-world: install
	$(BIN)/python -m compinv_utils.toy.evaluate --out data/toy/quality.json

strip:
	$(BIN)/nbstripout --keep-output --keep-count --extra-keys 'metadata.language_info' notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache
